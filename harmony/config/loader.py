# -*- test-case-name: tests.unit.test_config -*-
"""
Load a Harmony configuration: base file, pipelines directory, environment
substitution, validation against the schema, cross-references.

The result is a frozen L{HarmonyConfig}.  Every problem is a
L{ConfigError} naming the file and key path.
"""

import os
import re

try:
    import tomllib
except ImportError:  # Python < 3.11
    import tomli as tomllib

import attr

from harmony.config import model
from harmony.config.errors import ConfigError
from harmony.config.schema import Options, Where, unknown_key_message

#: Tables that pipelines files may contribute to (merged by name).
MERGED_TABLES = (
    "network",
    "endpoints",
    "backends",
    "pipelines",
    "targets",
    "middleware",
    "middleware_types",
    "services",
)

_ENV = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


@attr.s(frozen=True)
class HarmonyConfig:
    """
    A validated configuration.

    @ivar path: the base file.
    @ivar base_dir: its directory (relative paths are resolved against it).
    @ivar proxy, logging, storage, management: frozen L{Options}.
    @ivar networks, endpoints, backends, middleware, pipelines: name ->
        frozen entry (L{model.ServiceEntry}, L{model.MiddlewareEntry},
        L{model.PipelineEntry}, L{Options} for networks).
    @ivar warnings: deprecation and unused-entry warnings, as text.
    @ivar files: the files that were read, in order.
    """

    path = attr.ib()
    base_dir = attr.ib()
    proxy = attr.ib()
    logging = attr.ib()
    storage = attr.ib()
    management = attr.ib()
    networks = attr.ib()
    endpoints = attr.ib()
    backends = attr.ib()
    middleware = attr.ib()
    pipelines = attr.ib()
    warnings = attr.ib(converter=tuple)
    files = attr.ib(converter=tuple)

    def resolve_path(self, path):
        """
        A path from the config, resolved against the base file's directory.
        """
        return os.path.normpath(os.path.join(self.base_dir, path))


def load_config(path, registry=None, environ=None):
    """
    Read, merge, substitute and validate a configuration.

    @param path: the base C{.toml} file.
    @param registry: a L{harmony.registry.Registry} (default: built-ins
        and installed plugins).
    @param environ: the environment for C{${VAR}} substitution.
    @raise ConfigError: on any problem.
    @return: a L{HarmonyConfig}.
    """
    if registry is None:
        from harmony.registry import default_registry

        registry = default_registry()
    environ = os.environ if environ is None else environ
    path = os.path.abspath(path)
    base_dir = os.path.dirname(path)

    def shown(p):
        rel = os.path.relpath(p, base_dir)
        return p if rel.startswith("..") else rel

    if not path.endswith(".toml"):
        raise ConfigError("the configuration file must have a .toml extension", shown(path))
    base = _read_toml(path, shown(path))
    base = substitute_env(base, environ, Where(shown(path)))
    files = [path]

    proxy = base.get("proxy", {})
    if not isinstance(proxy, dict):
        raise ConfigError("expected table", shown(path), ("proxy",))
    origins = {}
    for table in MERGED_TABLES:
        if table in base:
            if not isinstance(base[table], dict):
                raise ConfigError("expected table", shown(path), (table,))
            for name in base[table]:
                origins[(table, name)] = shown(path)

    pipelines_path = proxy.get("pipelines_path", "pipelines")
    if isinstance(pipelines_path, str):
        pipelines_dir = os.path.join(base_dir, pipelines_path)
        if os.path.isdir(pipelines_dir):
            for fname in sorted(os.listdir(pipelines_dir)):
                fpath = os.path.join(pipelines_dir, fname)
                if not fname.endswith(".toml") or not os.path.isfile(fpath):
                    continue
                files.append(fpath)
                data = _read_toml(fpath, shown(fpath))
                data = substitute_env(data, environ, Where(shown(fpath)))
                _merge(base, data, shown(fpath), origins)

    where = Where(shown(path), origins=origins)
    return _validate(base, where, registry, path, base_dir, files, environ)


def _read_toml(path, shown):
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise ConfigError("file not found", shown)
    except OSError as e:
        raise ConfigError(f"cannot read file: {e.strerror}", shown)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise ConfigError(f"invalid TOML: not UTF-8 (at line {line}, byte {e.start})", shown)
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        message = str(e)
        if message.endswith("(at end of document)"):
            # Name the line and column there too.
            line = text.count("\n") + 1
            column = len(text) - text.rfind("\n")
            message = message[: -len(")")] + f", line {line}, column {column})"
        raise ConfigError(f"invalid TOML: {message}", shown)


def _merge(base, data, shown, origins):
    for key, value in data.items():
        if key not in MERGED_TABLES:
            raise ConfigError(
                f"a pipelines file may only define {', '.join(MERGED_TABLES)} tables",
                shown,
                (key,),
            )
        if not isinstance(value, dict):
            raise ConfigError("expected table", shown, (key,))
        target = base.setdefault(key, {})
        for name, entry in value.items():
            if name in target:
                raise ConfigError(
                    f"{key}.{name} is defined twice: in {origins[(key, name)]} and in {shown}",
                    shown,
                    (key, name),
                )
            target[name] = entry
            origins[(key, name)] = shown


def substitute_env(value, environ, where):
    """
    Replace C{${VAR}} and C{${VAR:-default}} in every string value; C{$$}
    is a literal C{$}.  An unset variable without a default is an error.
    """
    if isinstance(value, str):
        if "$" not in value:
            return value

        def repl(m):
            if m.group(0) == "$$":
                return "$"
            name, default = m.group(1), m.group(2)
            if name in environ and (environ[name] != "" or default is None):
                return environ[name]
            if default is not None:
                return default
            raise where.error(f"environment variable {name} is not set (use ${{{name}:-default}})")

        return _ENV.sub(repl, value)
    if isinstance(value, dict):
        return {k: substitute_env(v, environ, where.child(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [substitute_env(v, environ, where.child(i)) for i, v in enumerate(value)]
    return value


def _validate(data, where, registry, path, base_dir, files, environ=None):
    data = dict(data)
    _legacy_registries(data, where, registry)
    if "middleware_legacy" in data:
        data.pop("middleware_legacy")
        where.child("middleware_legacy").warn("deprecated legacy table, ignored")
    for key in data:
        if key not in model.TOP_LEVEL.fields:
            raise where.child(key).error(unknown_key_message(key, model.TOP_LEVEL.fields))
    if "proxy" not in data:
        raise where.child("proxy").error("required table is missing ([proxy] with id)")
    top = model.TOP_LEVEL.validate(data, where)
    top = model.resolve_log_level(top, data, where)
    management = _management(top, where.child("management"), os.environ if environ is None else environ)

    endpoints = {}
    for name, entry in top.endpoints.items():
        w = where.child("endpoints", where.origins.get(("endpoints", name))).child(name)
        endpoints[name] = _service_entry(name, entry, w, registry, "endpoint")
    backends = {}
    for name, entry in top.backends.items():
        w = where.child("backends", where.origins.get(("backends", name))).child(name)
        backends[name] = _backend_entry(name, entry, w, registry, top.targets)
    middleware = {}
    for name, entry in top.middleware.items():
        w = where.child("middleware", where.origins.get(("middleware", name))).child(name)
        middleware[name] = _middleware_entry(name, entry, w, registry)

    pipelines = {}
    owner = {}
    for name, entry in top.pipelines.items():
        w = where.child("pipelines", where.origins.get(("pipelines", name))).child(name)
        pipelines[name] = _pipeline_entry(
            name, entry, w, top.network, endpoints, backends, middleware, registry, owner
        )

    used_backends = {b for p in pipelines.values() for b in p.backends}
    used_targets = {t.name for b in backends.values() for t in b.targets}
    for name in top.targets:
        if name not in used_targets:
            where.child("targets", where.origins.get(("targets", name))).child(name).warn(
                "target is not used by any backend"
            )
    used_mw = {m for p in pipelines.values() for m in p.request_middleware + p.response_middleware}
    for name in endpoints:
        if name not in owner:
            w = where.child("endpoints", where.origins.get(("endpoints", name))).child(name)
            w.warn("endpoint is not used by any pipeline")
    for name in backends:
        if name not in used_backends:
            w = where.child("backends", where.origins.get(("backends", name))).child(name)
            w.warn("backend is not used by any pipeline")
    for name in middleware:
        if name not in used_mw:
            w = where.child("middleware", where.origins.get(("middleware", name))).child(name)
            w.warn("middleware is not used by any pipeline")

    return HarmonyConfig(
        path=path,
        base_dir=base_dir,
        proxy=top.proxy,
        logging=top.logging,
        storage=top.storage,
        management=management,
        networks=top.network,
        endpoints=Options(endpoints),
        backends=Options(backends),
        middleware=Options(middleware),
        pipelines=Options(pipelines),
        warnings=where.warnings,
        files=files,
    )


def _management(top, where, environ):
    """
    C{[management]}: its network exists, has an HTTP listener and serves
    no pipeline, nor shares its address with one that does; C{token_env}
    names a variable that is set.  The effective bearer token (from
    C{token_env}, else C{token}; empty: no authentication) is C{token} in
    the result.
    """
    options = top.management
    token = options.token
    if options.token_env:
        token = environ.get(options.token_env, "")
        if not token:
            raise where.child("token_env").error(
                f"environment variable {options.token_env} is not set or empty"
                " (the management API would have no authentication)"
            )
    if not options.enabled:
        return Options(dict(options, token=token))
    name = options.network
    if not name:
        raise where.child("network").error("required with enabled = true: the network the management API listens on")
    network = top.network.get(name)
    if network is None:
        raise where.child("network").error(_missing("network", name, top.network))
    if network.http is None:
        raise where.child("network").error(f"network {name!r} has no [network.{name}.http] listener")
    for pname, pipeline in top.pipelines.items():
        if name in pipeline.networks:
            raise where.child("network").error(
                f"network {name!r} also serves pipeline {pname!r}: the management API needs a network of its own"
            )
    address, port = network.http.bind_address, network.http.bind_port
    served = {n for p in top.pipelines.values() for n in p.networks}
    for other in sorted(served):
        http = top.network.get(other) and top.network[other].http
        if http is None or not port or http.bind_port != port:
            continue
        if address == http.bind_address or "0.0.0.0" in (address, http.bind_address) or "::" in (
            address,
            http.bind_address,
        ):
            raise where.child("network").error(
                f"network {name!r} listens on {address}:{port}, already used by network {other!r}"
            )
    return Options(dict(options, token=token))


def _legacy_registries(data, where, registry):
    """
    C{[services.<type>]} and C{[middleware_types.<type>]}: the old registry
    style.  An empty C{module} is accepted (with a deprecation warning) for
    built-in types; a non-empty one names a third-party type to load.
    """
    for table, kind in (("services", "service"), ("middleware_types", "middleware")):
        entries = data.pop(table, None)
        if entries is None:
            continue
        for type_name, entry in entries.items():
            w = where.child(table, where.origins.get((table, type_name))).child(type_name)
            if not isinstance(entry, dict):
                raise w.error(f"expected table, got {entry!r}")
            for key in entry:
                if key != "module":
                    raise w.child(key).error(unknown_key_message(key, ["module"]))
            module = entry.get("module", "")
            if not isinstance(module, str):
                raise w.child("module").error("expected string")
            if module == "":
                known = (
                    registry.service(type_name) if kind == "service" else registry.middleware(type_name)
                )
                if known is None:
                    raise w.error(f"unknown built-in {kind} type {type_name!r}")
                w.warn("deprecated legacy registry entry, not needed for built-in types")
            else:
                try:
                    registry.load(kind, type_name, module)
                except ConfigError as e:
                    raise w.child("module").error(e.message)


_OWN = object()


def _service_entry(name, entry, where, registry, role, options=_OWN):
    """
    An endpoint or backend entry; C{options}: the raw options to validate
    (default: the entry's own; C{None}: none, a backend with targets).
    """
    type_name = entry.service
    stype = registry.service(type_name, role)
    if stype is None:
        known = ", ".join(registry.service_names(role))
        raise where.child("service").error(f"unknown service type {type_name!r} (known: {known})")
    schema = stype.endpoint_options if role == "endpoint" else stype.backend_options
    if schema is None:
        article = "an" if role == "endpoint" else "a"
        raise where.child("service").error(f"service type {type_name!r} cannot be used as {article} {role}")
    if options is _OWN:
        options = entry.options
    if options is not None:
        options = schema.validate(dict(options), where.child("options"))
    return model.ServiceEntry(
        name=name, service=stype.name, options=options, file=where.file
    )


#: The address keys a target fills in, by kind.
_URL_KEYS = ("base_url",)
_DICOM_KEYS = ("aet", "host", "port")


def _backend_entry(name, entry, where, registry, targets_table):
    """
    A backend: its options, and with C{targets} one set of options per
    target (the target's address filled in); the selection, health-check,
    breaker and retry tables validated.
    """
    raw = dict(entry.options)
    retry_raw = dict(entry.retry or {})
    if "max_retries" in raw:
        # CONFIG.md: options.max_retries is the short form of retry.max_retries.
        if "max_retries" in retry_raw:
            raise where.child("options").child("max_retries").error(
                "max_retries is given twice (options and [retry]); keep one"
            )
        retry_raw["max_retries"] = raw.pop("max_retries")
    retry = model.RETRY.validate(retry_raw, where.child("retry"))
    health = None
    if entry.health_check is not None:
        health = model.HEALTH_CHECK.validate(dict(entry.health_check), where.child("health_check"))
    outlier = model.OUTLIER_DETECTION.validate(dict(entry.outlier_detection or {}), where.child("outlier_detection"))
    breaker = model.CIRCUIT_BREAKER.validate(dict(entry.circuit_breaker or {}), where.child("circuit_breaker"))
    resilient = bool(
        entry.targets
        or health is not None
        or retry.max_retries
        or entry.outlier_detection is not None
        or entry.circuit_breaker is not None
        or entry.rules
    )
    service = _service_entry(name, entry, where, registry, "backend", options=raw if not entry.targets else None)
    targets = _targets(entry, raw, where, registry.service(service.service), targets_table)
    selection = Options(
        {
            "strategy": entry.strategy,
            "hash_key": entry.hash_key,
            "rules": entry.rules,
            "health_check": health,
            "outlier_detection": outlier,
            "circuit_breaker": breaker,
            "retry": retry,
            "resilient": resilient,
        }
    )
    options = targets[0].options if targets else service.options
    return attr.evolve(service, options=options, targets=targets, selection=selection)


def _targets(entry, raw, where, stype, targets_table):
    if not entry.targets:
        if entry.rules:
            raise where.child("rules").error("rules choose among targets: list the backend's targets")
        return ()
    fields = stype.backend_options.fields
    if "base_url" in fields:
        kind, keys = "url", _URL_KEYS
    elif all(k in fields for k in _DICOM_KEYS):
        kind, keys = "dicom", _DICOM_KEYS
    else:
        raise where.child("targets").error(
            f"backends of service type {stype.name!r} have no address: they cannot have targets"
        )
    for key in keys:
        if key in raw:
            raise where.child("options").child(key).error(
                f"{key} and targets are exclusive: each [targets.<name>] gives the address"
            )
    out = []
    for i, tname in enumerate(entry.targets):
        w = where.child("targets").child(i)
        target = targets_table.get(tname)
        if target is None:
            raise w.error(_missing("target", tname, targets_table))
        if kind == "url" and not target.url:
            raise w.error(f"target {tname!r} has no url ({stype.name} backends need HTTP targets)")
        if kind == "dicom" and target.url:
            raise w.error(f"target {tname!r} has a url (dicom_scu backends need aet, host and port)")
        values = dict(raw)
        if kind == "url":
            values["base_url"] = target.url
            address = target.url
        else:
            values.update(aet=target.aet, host=target.host, port=target.port)
            address = f"{target.aet}@{target.host}:{target.port}"
        options = stype.backend_options.validate(values, where.child("options"))
        out.append(model.TargetEntry(name=tname, weight=target.weight, address=address, options=options))
    for i, rule in enumerate(entry.rules):
        for j, tname in enumerate(rule.targets):
            if tname not in entry.targets:
                raise where.child("rules").child(i).child("targets").child(j).error(
                    f"target {tname!r} is not one of this backend's targets ({', '.join(entry.targets)})"
                )
    return tuple(out)


def _middleware_entry(name, entry, where, registry):
    type_name = registry.canonical_middleware(entry.type)
    mtype = registry.middleware(type_name)
    if mtype is None:
        known = ", ".join(registry.middleware_names())
        raise where.child("type").error(f"unknown middleware type {entry.type!r} (known: {known})")
    if mtype.name == "connect":
        where.child("type").warn("middleware 'connect' is accepted for compatibility and does nothing")
    options = mtype.options.validate(dict(entry.options), where.child("options"))
    return model.MiddlewareEntry(name=name, type=mtype.name, options=options, file=where.file)


def _pipeline_entry(name, entry, where, networks, endpoints, backends, middleware, registry, owner):
    for i, ep in enumerate(entry.endpoints):
        if ep not in endpoints:
            raise where.child("endpoints").child(i).error(_missing("endpoint", ep, endpoints))
        if ep in owner:
            raise where.child("endpoints").child(i).error(
                f"endpoint {ep!r} already belongs to pipeline {owner[ep]!r}; an endpoint belongs to one pipeline"
            )
        owner[ep] = name
    if not entry.endpoints:
        raise where.child("endpoints").error("a pipeline needs at least one endpoint")
    for i, be in enumerate(entry.backends):
        if be not in backends:
            raise where.child("backends").child(i).error(_missing("backend", be, backends))
    for i, net in enumerate(entry.networks):
        if net not in networks:
            raise where.child("networks").child(i).error(_missing("network", net, networks))
        if networks[net].http is None:
            raise where.child("networks").child(i).error(
                f"network {net!r} has no [network.{net}.http] listener"
            )
    http_endpoints = [
        ep for ep in entry.endpoints if registry.service(endpoints[ep].service).endpoint_protocol == "http"
    ]
    if http_endpoints and not entry.networks:
        raise where.child("networks").error(
            f"endpoint {http_endpoints[0]!r} serves HTTP: the pipeline must list the networks it listens on"
        )
    if not entry.backends and http_endpoints:
        # Only DICOM endpoints may go without one: they store and answer
        # themselves (a store-only SCP).
        raise where.child("backends").error("a pipeline with HTTP endpoints needs at least one backend")

    request_mw, response_mw = [], []
    mw = entry.middleware
    if isinstance(mw, Options):
        request_mw = _middleware_names(mw.left, where.child("middleware").child("left"), middleware, registry)
        response_mw = _middleware_names(mw.right, where.child("middleware").child("right"), middleware, registry)
    else:
        request_mw = _middleware_names(mw, where.child("middleware"), middleware, registry)
        response_mw = list(reversed(request_mw))
    return model.PipelineEntry(
        name=name,
        description=entry.description,
        networks=entry.networks,
        endpoints=entry.endpoints,
        request_middleware=tuple(request_mw),
        response_middleware=tuple(response_mw),
        backends=entry.backends,
        failover_non_idempotent=entry.failover_non_idempotent,
        file=where.file,
    )


def _middleware_names(names, where, middleware, registry):
    """
    Resolve names in a pipeline's middleware list: a C{[middleware.<name>]}
    instance, or a built-in type used with default options.
    """
    out = []
    for i, name in enumerate(names):
        w = where.child(i)
        if name in middleware:
            out.append(name)
            continue
        canonical = registry.canonical_middleware(name)
        if canonical == "connect":
            w.warn("middleware 'connect' is accepted for compatibility and does nothing")
            continue
        mtype = registry.middleware(canonical)
        if mtype is None:
            raise w.error(
                f"unknown middleware {name!r}: no [middleware.{name}] table and no built-in type of that name"
            )
        options = mtype.options.validate({}, w)
        middleware[name] = model.MiddlewareEntry(name=name, type=mtype.name, options=options, file=w.file)
        out.append(name)
    return out


def _missing(kind, name, known):
    message = f"unknown {kind} {name!r}"
    import difflib

    hint = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if hint:
        message += f" (did you mean {hint[0]!r}?)"
    elif not known:
        message += f" (no {kind}s are defined)"
    return message
