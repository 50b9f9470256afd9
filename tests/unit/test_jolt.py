"""
The JOLT engine: a table of (spec, input, expected) cases for every
operation and feature, most of them the examples of the reference Java
JOLT's documentation and test fixtures (bazaarvoice/jolt, Apache-2.0),
plus Rust-Harmony style specs (C{&(n)}, C{&(n,m)}); then spec compile
errors (operation index and key path) and transform errors.
"""

import copy

import pytest

from harmony.transforms import SpecError, TransformError, compile_spec, transform


def shift(spec):
    return [{"operation": "shift", "spec": spec}]


def default(spec):
    return [{"operation": "default", "spec": spec}]


def remove(spec):
    return [{"operation": "remove", "spec": spec}]


def cardinality(spec):
    return [{"operation": "cardinality", "spec": spec}]


def overwrite(spec):
    return [{"operation": "modify-overwrite-beta", "spec": spec}]


def modify_default(spec):
    return [{"operation": "modify-default-beta", "spec": spec}]


def define(spec):
    return [{"operation": "modify-define-beta", "spec": spec}]


RATINGS = {
    "rating": {
        "primary": {"value": 3, "max": 5},
        "quality": {"value": 3, "max": 5},
        "sharpness": {"value": 7, "max": 10},
    }
}

SHIFT_CASES = [
    # -- the Shiftr javadoc -------------------------------------------------------------
    (
        "javadoc literal paths",
        shift({"rating": {"quality": {"value": "SecondaryRatings.quality.Value", "max": "SecondaryRatings.quality.RatingRange"}}}),
        {"rating": {"quality": {"value": 3, "max": 5}}},
        {"SecondaryRatings": {"quality": {"Value": 3, "RatingRange": 5}}},
    ),
    (
        "javadoc rating example: *, &1, $",
        shift(
            {
                "rating": {
                    "primary": {"value": "Rating", "max": "RatingRange"},
                    "*": {"value": "SecondaryRatings.&1.Value", "max": "SecondaryRatings.&1.Range", "$": "SecondaryRatings.&1.Id"},
                }
            }
        ),
        RATINGS,
        {
            "Rating": 3,
            "RatingRange": 5,
            "SecondaryRatings": {
                "quality": {"Value": 3, "Range": 5, "Id": "quality"},
                "sharpness": {"Value": 7, "Range": 10, "Id": "sharpness"},
            },
        },
    ),
    (
        "javadoc: list of the input keys with $",
        shift({"rating": {"*": {"$": "ratings"}}}),
        {"rating": {"primary": {"value": 3}, "quality": {"value": 3}}},
        {"ratings": ["primary", "quality"]},
    ),
    (
        "javadoc: # literal for a boolean value",
        shift({"hidden": {"true": {"#disabled": "clients.clientId"}}}),
        {"hidden": True},
        {"clients": {"clientId": "disabled"}},
    ),
    (
        "javadoc: | alternatives",
        shift({"rating|Rating": "rating-primary"}),
        {"Rating": 4},
        {"rating-primary": 4},
    ),
    (
        "javadoc: @ and $ together",
        shift({"foo": {"$": "place.to.put.key", "@": "place.to.put.value"}}),
        {"foo": {"a": 1}},
        {"place": {"to": {"put": {"key": "foo", "value": {"a": 1}}}}},
    ),
    (
        "javadoc: transpose @book -> @author",
        shift({"@book": "@author"}),
        {"author": "Stephen Hawking", "book": "A Brief History of Time"},
        {"Stephen Hawking": "A Brief History of Time"},
    ),
    (
        "javadoc: input arrays have numeric keys",
        shift({"Photos": {"1": "photo-&-url"}}),
        {"Photos": ["AAA.jpg", "BBB.jpg"]},
        {"photo-1-url": "BBB.jpg"},
    ),
    (
        "javadoc: explicit output indexes and [&(0,1)]",
        shift({"photo-1-id": "Photos[1].Id", "photo-*-url": "Photos[&(0,1)].Url"}),
        {"photo-1-id": "327704", "photo-1-url": "http://bob.com/0001/327704/photo.jpg"},
        {"Photos": [None, {"Id": "327704", "Url": "http://bob.com/0001/327704/photo.jpg"}]},
    ),
    (
        "javadoc: several output paths",
        shift({"foo": ["bar", "baz"]}),
        {"foo": 3},
        {"bar": 3, "baz": 3},
    ),
    (
        "javadoc: writing twice to a path makes an array (Java JOLT, not the Rust engine's error)",
        shift({"foo": "baz", "tuna": "baz"}),
        {"foo": "bar", "tuna": "marlin"},
        {"baz": ["bar", "marlin"]},
    ),
    # -- wildcards and references -------------------------------------------------------
    (
        "partial star with &(0,1)",
        shift({"tag-*": "tags.&(0,1)"}),
        {"tag-Pro": "Awesome", "tag-Con": "Bogus", "other": 1},
        {"tags": {"Pro": "Awesome", "Con": "Bogus"}},
    ),
    (
        "two stars: non-greedy groups",
        shift({"tag-*-*": "&(0,1).&(0,2)"}),
        {"tag-Foo-Bar-Baz": 1},
        {"Foo": {"Bar-Baz": 1}},
    ),
    (
        "three stars",
        shift({"a*b*c*": "out.&(0,1)&(0,2)&(0,3)"}),
        {"axbycz": 1},
        {"out": {"xyz": 1}},
    ),
    (
        "longer patterns are tried first (rating-range-* before rating-*)",
        shift({"rating-*": "short.&(0,1)", "rating-range-*": "long.&(0,1)"}),
        {"rating-range-x": 1, "rating-y": 2},
        {"long": {"x": 1}, "short": {"y": 2}},
    ),
    (
        "a literal key beats *",
        shift({"a": "lit", "*": "star.&"}),
        {"a": 1, "b": 2},
        {"lit": 1, "star": {"b": 2}},
    ),
    (
        "& sugar: & = &0 = &(0) = &(0,0)",
        shift({"*": ["a.&", "b.&0", "c.&(0)", "d.&(0,0)"]}),
        {"k": 1},
        {"a": {"k": 1}, "b": {"k": 1}, "c": {"k": 1}, "d": {"k": 1}},
    ),
    (
        "&n walks up the tree",
        shift({"foo": {"bar": {"baz": "&2.&1.&0"}}}),
        {"foo": {"bar": {"baz": 7}}},
        {"foo": {"bar": {"baz": 7}}},
    ),
    (
        "&(n,m) group of a key n levels up",
        shift({"*-*": {"value": "out.&(1,2).&(1,1)"}}),
        {"a-b": {"value": 1}},
        {"out": {"b": {"a": 1}}},
    ),
    (
        "& inside a key with literal text",
        shift({"*": "prefix-&-suffix"}),
        {"k": 1},
        {"prefix-k-suffix": 1},
    ),
    (
        "LHS & key: a key named after its parent (lhsAmpMatch)",
        shift({"*": {"&0-x": "found.&1", "*": "other.&1.&0"}}),
        {"a": {"a-x": 1, "b-x": 2}},
        {"found": {"a": 1}, "other": {"a": {"b-x": 2}}},
    ),
    (
        "$ of a parent key, $(0,1) of a star group",
        shift({"*": {"*-*": {"$1": "parents", "$(0,2)": "seconds"}}}),
        {"p": {"x-y": {}, "z-w": {}}},
        {"parents": ["p", "p"], "seconds": ["y", "w"]},
    ),
    (
        "#(literal) with parentheses",
        shift({"a": {"#(hello world)": "greeting"}}),
        {"a": 1},
        {"greeting": "hello world"},
    ),
    (
        "@(n,path) on the right: key from a sibling value",
        shift({"*": {"value": "byName.@(1,name)"}}),
        {"x": {"name": "alpha", "value": 1}, "y": {"name": "beta", "value": 2}},
        {"byName": {"alpha": 1, "beta": 2}},
    ),
    (
        "@(n,path) on the left: a value from up the tree",
        shift({"items": {"*": {"@(2,header.id)": "out[&1].headerId", "name": "out[&1].name"}}}),
        {"header": {"id": "H1"}, "items": [{"name": "a"}, {"name": "b"}]},
        {"out": [{"headerId": "H1", "name": "a"}, {"headerId": "H1", "name": "b"}]},
    ),
    (
        "@(n,path) look-up of something missing writes nothing",
        shift({"a": {"@(1,missing)": "x", "@": "y"}}),
        {"a": 1},
        {"y": 1},
    ),
    (
        "@ numbers and booleans become keys",
        shift({"*": {"value": "out.@(1,id)"}}),
        {"a": {"id": 7.9, "value": "x"}, "b": {"id": True, "value": "y"}},
        {"out": {"7": "x", "true": "y"}},
    ),
    (
        "a scalar is matched as a key (Java toString: 5.0)",
        shift({"score": {"5.0": {"#top": "grade"}, "*": {"$": "other"}}}),
        {"score": 5.0},
        {"grade": "top"},
    ),
    (
        "scalar matched by * gives the value with $",
        shift({"type": {"*": {"$": "kind"}}}),
        {"type": "foo"},
        {"kind": "foo"},
    ),
    # -- output arrays ------------------------------------------------------------------
    (
        "[] appends",
        shift({"*": "all[]"}),
        {"a": 1, "b": {"c": 2}},
        {"all": [1, {"c": 2}]},
    ),
    (
        "[&1] keeps input array positions",
        shift({"photos": {"*": {"url": "urls[&1]"}}}),
        {"photos": [{"url": "u0"}, {"caption": "no url"}, {"url": "u2"}]},
        {"urls": ["u0", None, "u2"]},
    ),
    (
        "[#2] counts matches: an object becomes an array",
        shift({"photos": {"*": {"url": "list[#2].url", "$": "list[#2].id"}}}),
        {"photos": {"p1": {"url": "u1"}, "p2": {"url": "u2"}}},
        {"list": [{"url": "u1", "id": "p1"}, {"url": "u2", "id": "p2"}]},
    ),
    (
        "[] in the middle makes a new element each time",
        shift({"*": {"@": "rows[].value"}}),
        {"a": 1, "b": 2},
        {"rows": [{"value": 1}, {"value": 2}]},
    ),
    (
        "array index from a value [@(1,pos)]",
        shift({"*": {"name": "byPos[@(1,pos)]"}}),
        {"a": {"pos": 2, "name": "x"}, "b": {"pos": 0, "name": "y"}},
        {"byPos": ["y", None, "x"]},
    ),
    (
        "index key on an input array ignores other elements",
        shift({"list": {"0": "first", "2": "third"}}),
        {"list": ["a", "b", "c"]},
        {"first": "a", "third": "c"},
    ),
    # -- nulls, escapes, identity -----------------------------------------------------------
    (
        "null values are passed through (passNullThru)",
        shift({"key": "value", "bunch-O-keys": {"*": "values.&", "@(1,notLegit)": "notLegit"}}),
        {"key": None, "bunch-O-keys": {"a": None, "b": None}},
        {"value": None, "values": {"a": None, "b": None}},
    ),
    (
        "null on the right drops the data",
        shift({"secret": None, "*": "&"}),
        {"secret": "x", "kept": 1},
        {"kept": 1},
    ),
    (
        "nothing matched: null output",
        shift({"absent": "x"}),
        {"present": 1},
        None,
    ),
    (
        "identity with @ to the root",
        shift({"@": ""}),
        {"a": [1, {"b": None}]},
        {"a": [1, {"b": None}]},
    ),
    (
        "escapes: \\@ \\$ \\. on the left, \\. on the right",
        shift({"\\@context": "ctx", "\\$id": "id", "a\\.b": "dotted\\.key"}),
        {"@context": "c", "$id": 1, "a.b": 2},
        {"ctx": "c", "id": 1, "dotted.key": 2},
    ),
    (
        "output into an array at the top",
        shift({"a": "[0]", "b": "[1]"}),
        {"a": "x", "b": "y"},
        ["x", "y"],
    ),
    # -- Rust Harmony style specs -------------------------------------------------------------
    (
        "Rust Harmony simple_rename.json",
        shift({"name": "full_name", "id": "patient_id", "account": "financial_info", "*": "other.&"}),
        {"name": "Jane", "id": 12345, "account": {"balance": 1}, "extra_field": "e"},
        {"full_name": "Jane", "patient_id": 12345, "financial_info": {"balance": 1}, "other": {"extra_field": "e"}},
    ),
    (
        "Rust Harmony &(n) and &(n,m) forms",
        shift({"data": {"matches": {"*": {"*": {"Value": {"0": "data.entry[&(3)].resource.&(2,0)"}}}}}}),
        {"data": {"matches": [{"StudyUID": {"Value": ["1.2"]}, "Date": {"Value": ["2023"]}}]}},
        {"data": {"entry": [{"resource": {"StudyUID": "1.2", "Date": "2023"}}]}},
    ),
    (
        "Rust Harmony query_params to metadata",
        shift({"query_params": {"patient": {"0": "metadata.PatientID"}, "modality": {"0": "metadata.ModalitiesInStudy"}}}),
        {"query_params": {"patient": ["P1"], "modality": ["CT", "MR"]}},
        {"metadata": {"PatientID": "P1", "ModalitiesInStudy": "CT"}},
    ),
    (
        "&0 is &(0,0) as in Java (fluvio-jolt read it as & then '0')",
        shift({"*": "data.&0"}),
        {"id": 1, "name": "n"},
        {"data": {"id": 1, "name": "n"}},
    ),
]

DEFAULT_CASES = [
    (
        "Defaultr javadoc example",
        default(
            {
                "RatingRange": 5,
                "SecondaryRatings": {
                    "quality|value": {"ValueLabel": None, "Label": None, "MaxLabel": "Great", "MinLabel": "Terrible", "DisplayType": "NORMAL"},
                    "*": {"Range": 5, "ValueLabel": None, "Label": None, "MaxLabel": "High", "MinLabel": "Low", "DisplayType": "NORMAL"},
                },
            }
        ),
        {"Rating": 3, "SecondaryRatings": {"quality": {"Range": 7, "Value": 3, "Id": "quality"}, "sharpness": {"Value": 4, "Id": "sharpness"}}},
        {
            "Rating": 3,
            "RatingRange": 5,
            "SecondaryRatings": {
                "quality": {"Range": 7, "Value": 3, "Id": "quality", "ValueLabel": None, "Label": None, "MaxLabel": "Great", "MinLabel": "Terrible", "DisplayType": "NORMAL"},
                "sharpness": {"Range": 5, "Value": 4, "Id": "sharpness", "ValueLabel": None, "Label": None, "MaxLabel": "High", "MinLabel": "Low", "DisplayType": "NORMAL"},
            },
        },
    ),
    (
        "existing values stay, nulls are defaulted",
        default({"a": 1, "b": 2, "c": {"d": 3}}),
        {"a": "kept", "b": None},
        {"a": "kept", "b": 2, "c": {"d": 3}},
    ),
    (
        "a default of the wrong container kind leaves the input alone",
        default({"a": {"x": 1}}),
        {"a": [1, 2]},
        {"a": [1, 2]},
    ),
    (
        "* applies to keys already there, including ones defaulted at the same level",
        default({"new": {}, "*": {"seen": True}}),
        {"old": {}, "scalar": 5},
        {"old": {"seen": True}, "scalar": 5, "new": {"seen": True}},
    ),
    (
        "javadoc array entry: photos[] with index keys",
        default({"photos[]": {"2": {"url": "http://www.bazaarvoice.com", "caption": ""}}}),
        {},
        {"photos": [None, None, {"url": "http://www.bazaarvoice.com", "caption": ""}]},
    ),
    (
        "array entry: * and | over indexes",
        default({"list[]": {"*": {"x": 0}, "0|1": {"first": True}}}),
        {"list": [{}, {"x": 5}]},
        {"list": [{"x": 0, "first": True}, {"x": 5, "first": True}]},
    ),
    (
        "top-level array input",
        default({"1": {"b": 2}, "*": {"all": True}}),
        [{"a": 1}],
        [{"a": 1, "all": True}, {"b": 2, "all": True}],
    ),
    (
        "null input is an empty object",
        default({"status": "ok"}),
        None,
        {"status": "ok"},
    ),
    (
        "defaults are copies (later changes do not leak)",
        default({"*": {"tags": []}, "a": {}, "b": {}}) + overwrite({"a": {"tags": {"[0]": "x"}}}),
        {},
        {"a": {"tags": ["x"]}, "b": {"tags": []}},
    ),
]

REMOVE_CASES = [
    (
        "Removr javadoc example",
        remove({"~emVersion": "", "productId": "", "submissionId": "", "configured": {"c": ""}}),
        {"~emVersion": "2", "id": "123124", "productId": "31231231", "submissionId": "34343", "this": "stays", "configured": {"a": "b", "c": "d"}},
        {"id": "123124", "this": "stays", "configured": {"a": "b"}},
    ),
    (
        "javadoc: * walks every key",
        remove({"ratings": {"*": {"b": ""}}}),
        {"ratings": {"Set1": {"a": "a", "b": "b"}, "Set2": {"c": "c", "b": "b"}}},
        {"ratings": {"Set1": {"a": "a"}, "Set2": {"c": "c"}}},
    ),
    (
        "javadoc: partial star",
        remove({"ratings_*": {"Set1": ""}}),
        {"ratings_legacy": {"Set1": 1, "Set2": 2}, "ratings_new": {"Set1": 1, "Set2": 2}, "other": {"Set1": 1}},
        {"ratings_legacy": {"Set2": 2}, "ratings_new": {"Set2": 2}, "other": {"Set1": 1}},
    ),
    (
        "array indexes are removed from the highest down",
        remove({"array": {"0": "", "3": ""}}),
        {"array": ["a", "b", "c", "d", "e"]},
        {"array": ["b", "c", "e"]},
    ),
    (
        "* walks into array elements",
        remove({"items": {"*": {"secret": ""}}}),
        {"items": [{"secret": 1, "ok": 2}, {"ok": 3}]},
        {"items": [{"ok": 2}, {"ok": 3}]},
    ),
    (
        "| and * removal",
        remove({"a|b": "", "c*": ""}),
        {"a": 1, "b": 2, "cat": 3, "dog": 4},
        {"dog": 4},
    ),
]

CARDINALITY_CASES = [
    (
        "javadoc ONE",
        cardinality({"review": {"rating": "ONE"}}),
        {"review": {"rating": [5, 4]}},
        {"review": {"rating": 5}},
    ),
    (
        "javadoc * over array items",
        cardinality({"photosArray": {"*": {"url": "ONE"}}}),
        {"photosArray": [{"url": ["n.jpg", "t.jpg"], "caption": "c"}, {"url": ["t.jpg"], "caption": "c"}]},
        {"photosArray": [{"url": "n.jpg", "caption": "c"}, {"url": "t.jpg", "caption": "c"}]},
    ),
    (
        "javadoc @: views to ONE, count to MANY",
        cardinality({"views": {"@": "ONE", "count": "MANY"}}),
        {"views": [{"count": 1024}, {"count": 2048}]},
        {"views": {"count": [1024]}},
    ),
    (
        "MANY: scalar, object, null, empty array",
        cardinality({"a": "MANY", "b": "MANY", "c": "MANY", "d": "MANY", "e": "ONE"}),
        {"a": "x", "b": {"k": 1}, "c": None, "d": [], "e": []},
        {"a": ["x"], "b": [{"k": 1}], "c": [], "d": [], "e": None},
    ),
    (
        "@ MANY then walk into the new array",
        cardinality({"photos": {"@": "MANY", "*": {"url": "ONE"}}}),
        {"photos": {"url": ["a", "b"]}},
        {"photos": [{"url": "a"}]},
    ),
    (
        "star pattern and a value inside an array (a Harmony extension: Java throws)",
        cardinality({"list-*": {"*": "MANY"}}),
        {"list-a": [1, [2]], "other": 3},
        {"list-a": [[1], [2]], "other": 3},
    ),
]

MODIFY_CASES = [
    (
        "strings: toUpper toLower trim concat join split substring leftPad rightPad",
        overwrite(
            {
                "up": "=toUpper",
                "low": "=toLower",
                "trimmed": "=trim",
                "full": "=concat(@(1,first), ' ', @(1,last))",
                "joined": "=join(',', @(1,list))",
                "parts": "=split('-', @(1,code))",
                "sub": "=substring(@(1,code), 0, 3)",
                "left": "=leftPad(@(1,num), 5, '0')",
                "right": "=rightPad(@(1,num), 5, '.')",
            }
        ),
        {"up": "abc", "low": "ABC", "trimmed": "  x  ", "first": "Jane", "last": "Doe", "list": ["a", "b", "c"], "code": "ABC-12-x", "num": "42"},
        {
            "up": "ABC",
            "low": "abc",
            "trimmed": "x",
            "first": "Jane",
            "last": "Doe",
            "full": "Jane Doe",
            "list": ["a", "b", "c"],
            "joined": "a,b,c",
            "code": "ABC-12-x",
            "parts": ["ABC", "12", "x"],
            "sub": "ABC",
            "num": "42",
            "left": "00042",
            "right": "42...",
        },
    ),
    (
        "conversions: toInteger toDouble toBoolean toString not",
        overwrite({"i": "=toInteger", "d": "=toDouble", "b": "=toBoolean", "s": "=toString", "n": "=not", "list": "=toInteger"}),
        {"i": "42", "d": "2", "b": "TRUE", "s": 5.0, "n": True, "list": ["1", "x", 2.7]},
        {"i": 42, "d": 2.0, "b": True, "s": "5.0", "n": False, "list": [1, "x", 2]},
    ),
    (
        "lists: size firstElement lastElement elementAt",
        overwrite(
            {
                "size": "=size(@(1,list))",
                "first": "=firstElement(@(1,list))",
                "last": "=lastElement(@(1,list))",
                "second": "=elementAt(1, @(1,list))",
                "nameSize": "=size(@(1,name))",
            }
        ),
        {"list": ["a", "b", "c"], "name": "four"},
        {"list": ["a", "b", "c"], "name": "four", "size": 3, "first": "a", "last": "c", "second": "b", "nameSize": 4},
    ),
    (
        "squashNulls and recursivelySquashNulls",
        overwrite({"flat": "=squashNulls", "deep": "=recursivelySquashNulls"}),
        {"flat": [1, None, 2], "deep": {"a": None, "b": [None, {"c": None, "d": 1}]}},
        {"flat": [1, 2], "deep": {"b": [{"d": 1}]}},
    ),
    (
        "math: min max abs avg intSum doubleSum divide divideAndRound",
        overwrite(
            {
                "min": "=min(@(1,nums))",
                "max": "=max(@(1,nums))",
                "abs": "=abs(@(1,neg))",
                "avg": "=avg(@(1,nums))",
                "intSum": "=intSum(@(1,nums))",
                "doubleSum": "=doubleSum(@(1,nums))",
                "divide": "=divide(@(1,neg), 4)",
                "rounded": "=divideAndRound(2, 10, 3)",
                "strings": "=max('3', 2, '10.5')",
            }
        ),
        {"nums": [3, 1, "2"], "neg": -7},
        {
            "nums": [3, 1, "2"],
            "neg": -7,
            "min": 1,
            "max": 3,
            "abs": 7,
            "avg": 2.0,
            "intSum": 6,
            "doubleSum": 6.0,
            "divide": -1.75,
            "rounded": 3.33,
            "strings": 10.5,
        },
    ),
    (
        "noop leaves the value, functions that give nothing write nothing",
        overwrite({"a": "=noop", "b": "=toInteger", "c": "=divide(1, 0)"}),
        {"a": 1, "b": "not a number"},
        {"a": 1, "b": "not a number"},
    ),
    (
        "@(n,path) references and literal values",
        overwrite({"item": {"*": {"currency": "@(3,defaults.currency)", "kind": "product"}}}),
        {"defaults": {"currency": "EUR"}, "item": [{"price": 1}, {"price": 2}]},
        {"defaults": {"currency": "EUR"}, "item": [{"price": 1, "currency": "EUR", "kind": "product"}, {"price": 2, "currency": "EUR", "kind": "product"}]},
    ),
    (
        "missing objects are created; ? keys only apply if present",
        overwrite({"meta": {"version": 2}, "opt?": "=toUpper", "present?": "=toUpper"}),
        {"present": "x"},
        {"present": "X", "meta": {"version": 2}},
    ),
    (
        "fallback list: first value found wins",
        overwrite({"id": ["=toInteger", 0], "name": ["@(1,alias)", "anonymous"]}),
        {"id": "abc"},
        {"id": 0, "name": "anonymous"},
    ),
    (
        "modify-default-beta: only missing or null",
        modify_default({"a": 1, "b": 2, "c": 3}),
        {"a": "kept", "b": None},
        {"a": "kept", "b": 2, "c": 3},
    ),
    (
        "modify-define-beta: only missing",
        define({"a": 1, "b": 2, "c": 3}),
        {"a": "kept", "b": None},
        {"a": "kept", "b": None, "c": 3},
    ),
    (
        "key prefixes switch one key's mode: ~ default, _ define, + overwrite",
        modify_default({"~a": 1, "_b": 2, "+c": 3}),
        {"a": None, "b": None, "c": "old"},
        {"a": 1, "b": None, "c": 3},
    ),
    (
        "[n] keys pad the array",
        overwrite({"list": {"[2]": "third", "[0]": "=toUpper"}}),
        {"list": ["a"]},
        {"list": ["A", None, "third"]},
    ),
    (
        "* over an array and a star pattern over keys",
        overwrite({"rows": {"*": {"name-*": "=toUpper"}}}),
        {"rows": [{"name-first": "ada", "age": 1}, {"name-last": "lovelace"}]},
        {"rows": [{"name-first": "ADA", "age": 1}, {"name-last": "LOVELACE"}]},
    ),
]

OTHER_CASES = [
    (
        "sort: keys sorted recursively, ~ keys first, arrays keep their order",
        [{"operation": "sort"}],
        {"b": 1, "~z": 0, "a": {"d": [{"y": 1, "x": 2}, 3], "c": None}},
        {"~z": 0, "a": {"c": None, "d": [{"x": 2, "y": 1}, 3]}, "b": 1},
    ),
    (
        "a chain: shift, default, remove, modify, cardinality, sort",
        shift({"person": {"name": "name", "phones": "phones", "tmp": "tmp"}})
        + default({"name": "unknown", "active": True})
        + remove({"tmp": ""})
        + overwrite({"name": "=toUpper"})
        + cardinality({"phones": "MANY"})
        + [{"operation": "sort"}],
        {"person": {"name": "ada", "phones": "555", "tmp": 1}},
        {"active": True, "name": "ADA", "phones": ["555"]},
    ),
    (
        "a single {operation, spec} object is a chain of one",
        {"operation": "shift", "spec": {"a": "b"}},
        {"a": 1},
        {"b": 1},
    ),
]

CASES = SHIFT_CASES + DEFAULT_CASES + REMOVE_CASES + CARDINALITY_CASES + MODIFY_CASES + OTHER_CASES


@pytest.mark.parametrize("name, spec, data, expected", CASES, ids=[c[0] for c in CASES])
def test_table(name, spec, data, expected):
    original = copy.deepcopy(data)
    output = transform(compile_spec(spec), data)
    assert output == expected
    assert type(output) is type(expected)
    assert data == original, "the input must not be changed"


def test_output_values_are_copies():
    """
    Data written to two places is two objects (Java JOLT shares them).
    """
    out = transform(compile_spec(shift({"a": ["x", "y"]}) + overwrite({"x": {"[0]": "changed"}})), {"a": [1]})
    assert out == {"x": ["changed"], "y": [1]}


def test_deterministic():
    spec = compile_spec(SHIFT_CASES[1][1])
    outputs = {repr(transform(spec, RATINGS)) for _ in range(5)}
    assert len(outputs) == 1


def test_raw_spec_is_compiled():
    assert transform(shift({"a": "b"}), {"a": 1}) == {"b": 1}


def test_context_lookup_in_modify():
    spec = compile_spec(overwrite({"region": "^settings.region", "upper": "=toUpper(^settings.region)"}))
    assert transform(spec, {}, context={"settings": {"region": "eu"}}) == {"region": "eu", "upper": "EU"}
    assert transform(spec, {}) == {}


SPEC_ERRORS = [
    ("not a list", {"spec": {}}, "a JOLT spec must be an array"),
    ("empty chain", [], "at least one operation"),
    ("entry not an object", ["shift"], "operation 0: expected an object"),
    ("unknown operation", [{"operation": "shfit", "spec": {}}], "operation 0: unknown operation 'shfit' (did you mean 'shift'?)"),
    ("Java class name", [{"operation": "com.example.MyTransform", "spec": {}}], "unknown operation 'com.example.MyTransform'"),
    ("missing spec", [{"operation": "shift"}], "operation 0 (shift): \"spec\" is missing"),
    ("unknown entry key", [{"operation": "shift", "spec": {"a": "b"}, "specs": {}}], "unknown key 'specs'"),
    ("shift spec not an object", shift(["a"]), "operation 0 (shift): a shift spec must be an object"),
    ("empty sub-spec", shift({"tuna": {}}), "operation 0 (shift): spec.tuna: an empty object {}"),
    ("bad @ key", shift({"tuna-*": {"rating-@": "x"}}), "spec.tuna-*.rating-@: invalid key 'rating-@'"),
    ("@ alone on the right", shift({"a": "x.@.y"}), "spec.a: unable to parse path 'x.@.y': invalid '@' step"),
    ("@ at the end of a path", shift({"a": "x.@"}), "spec.a: '@' alone is not valid in a path: 'x.@'"),
    ("* on the right", shift({"a": "x.*"}), "spec.a: path 'x.*' can not contain '*' or '$'"),
    ("unbalanced @(", shift({"a": "@(1,b"}), "spec.a: unable to parse path"),
    ("& reference above the root", [{"operation": "default", "spec": {}}] + shift({"a": {"b": "&4"}}), "operation 1 (shift): spec.a.b: '&4' refers 4 level(s) up"),
    ("& group that does not exist", shift({"a-*": {"b": "&(1,2)"}}), "spec.a-*.b: '&(1,2)' refers to wildcard group 2"),
    ("negative array index", shift({"a": "x[-1]"}), "spec.a: bad explicit array index '-1'"),
    ("mixed * and &", shift({"a-&-*": "x"}), "can not mix '*' with '&'"),
    ("bad shift value", shift({"a": {"b": 5}}), "spec.a.b: invalid shift value 5"),
    ("path in a list not a string", shift({"a": ["x", 3]}), "spec.a[1]: an output path must be a string"),
    ("duplicate after |", shift({"a|b": "x", "b": "y"}), "duplicate key 'b'"),
    ("array key on the left of shift", shift({"list": {"[1]": "x"}}), "array key '[1]' is not valid on the left"),
    ("$ with children", shift({"a": {"$": {"b": "c"}}}), "spec.a.$: '$' key can not have children"),
    ("remove value not empty", remove({"a": "eh?"}), "operation 0 (remove): spec.a: invalid remove value 'eh?'"),
    ("default bad star", default({"a*": 1}), "spec.a*: invalid key 'a*'"),
    ("default array with names", default({"list[]": {"name": 1}}), 'spec."list[]".name: keys under an array'),
    ("cardinality bad value", cardinality({"a": "SOME"}), "spec.a: invalid cardinality 'SOME'"),
    ("cardinality @ with children", cardinality({"a": {"@": {"b": "ONE"}}}), "'@' key can not have children"),
    ("unknown function", overwrite({"a": "=nonnull"}), "operation 0 (modify-overwrite-beta): spec.a: unknown function 'nonnull'"),
    ("malformed function call", overwrite({"a": "=concat(x"}), "spec.a: malformed function call"),
    ("modify @ key", overwrite({"@": 1}), "key '@' is not valid in a modify spec"),
    ("modify mixed index and name keys", overwrite({"a": {"[0]": 1, "b": 2}}), "can not mix array index and object keys"),
    ("modify non-explicit index", overwrite({"a": {"[&1]": 1}}), "only explicit array indexes"),
    ("modify bad look-up argument", overwrite({"a": "=toUpper(@(1,b).c)"}), "expected an '@(n,path)' look-up"),
]


@pytest.mark.parametrize("name, spec, message", SPEC_ERRORS, ids=[e[0] for e in SPEC_ERRORS])
def test_spec_errors(name, spec, message):
    with pytest.raises(SpecError) as info:
        compile_spec(spec)
    assert message in str(info.value)


def test_spec_error_attributes():
    with pytest.raises(SpecError) as info:
        compile_spec(default({}) + shift({"a": {"b c": {"d": "&9"}}}))
    error = info.value
    assert (error.index, error.operation, error.path) == (1, "shift", ("a", "b c", "d"))
    assert str(error).startswith('operation 1 (shift): spec.a."b c".d: ')


def test_transform_error_top_level_array_default():
    spec = compile_spec(shift({"@": ""}) + default({"name": "x"}))
    with pytest.raises(TransformError) as info:
        transform(spec, [1])
    assert str(info.value) == "operation 1 (default): this default spec can not handle an input that is an array at the top"


def test_transform_error_huge_array_index_from_input():
    spec = compile_spec(shift({"item-*": "list[&(0,1)]"}))
    assert transform(spec, {"item-2": "x"}) == {"list": [None, None, "x"]}
    with pytest.raises(TransformError) as info:
        transform(spec, {"item-999999999": "x"})
    assert "999999999" not in str(info.value)


def test_deep_input_is_a_transform_error():
    deep = current = {}
    for _ in range(5000):
        current["a"] = {}
        current = current["a"]
    with pytest.raises(TransformError):
        transform(compile_spec(shift({"@": ""})), deep)
