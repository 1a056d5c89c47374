"""The function-tool registry: schemas from signatures, validation, failures as observations,
parallel calls, loading a user's file."""

import json
import threading
import time
from dataclasses import dataclass
from typing import Literal

import pytest
from pydantic import BaseModel

from glmkit.chat.functions import FunctionRegistry, Tool, function_tool, load_functions, schema_tool
from glmkit.errors import GlmkitError


def get_weather(city: str, days: int = 1, unit: Literal["celsius", "fahrenheit"] = "celsius",
                hourly: bool | None = None, tags: list[str] = [], ratio: float = 0.5) -> dict:  # noqa: B006
    """Look up the weather forecast
    for a city.

    Args:
        city: The city name, e.g. 北京.
        days (int): How many days
            ahead to forecast.
        unit: Temperature unit.

    Returns:
        The forecast.
    """
    return {"city": city, "days": days, "unit": unit, "hourly": hourly, "tags": tags, "ratio": ratio}


def test_schema_of_a_typical_signature():
    assert function_tool(get_weather).spec() == {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Look up the weather forecast for a city.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "The city name, e.g. 北京."},
                    "days": {"type": "integer", "description": "How many days ahead to forecast.", "default": 1},
                    "unit": {"type": "string", "description": "Temperature unit.",
                             "default": "celsius", "enum": ["celsius", "fahrenheit"]},
                    "hourly": {"anyOf": [{"type": "boolean"}, {"type": "null"}], "default": None},
                    "tags": {"type": "array", "default": [], "items": {"type": "string"}},
                    "ratio": {"type": "number", "default": 0.5},
                },
                "required": ["city"],
            },
        },
    }


def numpy_style(query: str, limit: int, title: str = "") -> str:
    """Search the notes.

    Parameters
    ----------
    query : str
        Words to look for.
    limit : int
        At most this many
        results.

    Returns
    -------
    str
    """
    return query


def sphinx_style(path: str, json: bool = False) -> str:
    """Read a file.

    :param path: Where the file is.
    :param bool json: Parse it as JSON.
    """
    return path


def test_numpy_and_sphinx_docstrings_and_awkward_parameter_names():
    # `title` and `json` are parameter names, not schema keywords or pydantic attributes
    assert function_tool(numpy_style).parameters == {
        "type": "object",
        "properties": {"query": {"type": "string", "description": "Words to look for."},
                       "limit": {"type": "integer", "description": "At most this many results."},
                       "title": {"type": "string", "default": ""}},
        "required": ["query", "limit"],
    }
    tool = function_tool(sphinx_style)
    assert tool.description == "Read a file."
    assert tool.parameters["properties"] == {"path": {"type": "string", "description": "Where the file is."},
                                             "json": {"type": "boolean", "description": "Parse it as JSON.",
                                                      "default": False}}
    assert FunctionRegistry([tool]).call("sphinx_style", '{"path": "a.txt", "json": true}').content == "a.txt"


def test_valid_call_coerces_and_returns_json():
    reg = FunctionRegistry([get_weather])
    r = reg.call("get_weather", '{"city": "北京", "days": "3", "tags": ["a"]}')
    assert r.ok and r.error is None
    assert r.content == ('{"city": "北京", "days": 3, "unit": "celsius", "hourly": null, "tags": ["a"], '
                         '"ratio": 0.5}')


def test_bad_arguments_come_back_as_observations():
    reg = FunctionRegistry([get_weather])
    r = reg.call("get_weather", '{"days": "x", "unit": "kelvin", "color": 1}')
    assert not r.ok
    assert r.content == (
        "error: invalid arguments for get_weather: city: missing (required); "
        'days: input should be a valid integer, unable to parse string as an integer (got "x"); '
        "unit: input should be 'celsius' or 'fahrenheit' (got \"kelvin\"); "
        "color: unexpected argument (not a parameter of this tool)")
    assert reg.call("get_weather", '{"city": ').content == (
        "error: invalid arguments for get_weather: not valid JSON (Expecting value at line 1 column 10); "
        'send one JSON object such as {"name": value}')
    assert reg.call("get_weather", '["Paris"]').content == (
        "error: invalid arguments for get_weather: expected a JSON object of named arguments, got a list")
    assert reg.call("get_wether", "{}").content == (
        "error: there is no tool named 'get_wether' (available tools: get_weather)")


def test_exceptions_and_timeouts_come_back_as_observations():
    def divide(a: float, b: float) -> float:
        """Divide a by b."""
        return a / b

    release = threading.Event()

    def stuck() -> str:
        """Never returns in time."""
        release.wait(10)
        return "late"

    def leave() -> None:
        """Calls sys.exit."""
        raise SystemExit(3)

    def refuse(city: str) -> str:
        """Raises a user-facing error."""
        raise GlmkitError(f"no station in {city}; give a provincial capital")

    reg = FunctionRegistry([divide, leave, refuse], timeout=5)
    reg.add(stuck, timeout=0.2)
    assert reg.call("divide", {"a": 1, "b": 4}).content == "0.25"
    r = reg.call("divide", '{"a": 1, "b": 0}')
    assert (r.ok, r.content) == (False, "error: divide raised ZeroDivisionError: float division by zero")
    t0 = time.monotonic()
    r = reg.call("stuck", "")
    assert r.content == "error: stuck did not finish within 0.2 s and was abandoned (timed out)"
    assert time.monotonic() - t0 < 5
    release.set()
    assert reg.call("leave", None).content == "error: leave raised SystemExit: 3"
    assert reg.call("refuse", '{"city": "Atlantis"}').content == (
        "error: refuse: no station in Atlantis; give a provincial capital")
    assert reg.call("divide", '{"a": 6, "b": 3}').content == "2.0"  # the registry still works


def test_call_many_runs_in_parallel_and_keeps_order():
    barrier = threading.Barrier(3, timeout=5)  # only passes if three calls run at the same time

    def wait_for_peers(n: int) -> int:
        """Meet two other calls."""
        barrier.wait()
        return n * n

    reg = FunctionRegistry([wait_for_peers])
    results = reg.call_many([("wait_for_peers", {"n": 2}), ("wait_for_peers", '{"n": 3}'),
                             ("wait_for_peers", '{"n": 4}')])
    assert [r.content for r in results] == ["4", "9", "16"]
    mixed = reg.call_many([("missing", "{}"), ("wait_for_peers", "{bad")])
    assert [r.ok for r in mixed] == [False, False]


def test_explicit_schema_tool_is_validated_by_json_schema():
    def lookup(**kwargs) -> dict:
        return kwargs

    params = {"type": "object", "properties": {"ids": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
                                               "mode": {"enum": ["fast", "exact"]}},
              "required": ["ids"], "additionalProperties": False}
    tool = schema_tool(lookup, params, name="lookup", description="Look records up by id.")
    assert tool.spec()["function"] == {"name": "lookup", "description": "Look records up by id.", "parameters": params}
    reg = FunctionRegistry([tool])
    assert reg.call("lookup", '{"ids": [1, 2], "mode": "fast"}').content == '{"ids": [1, 2], "mode": "fast"}'
    assert reg.call("lookup", '{"ids": [1, "x"], "mode": "slow"}').content == (
        "error: invalid arguments for lookup: ids[1]: 'x' is not of type 'integer'; "
        "mode: 'slow' is not one of ['fast', 'exact']")
    with pytest.raises(GlmkitError, match="not a valid JSON Schema"):
        schema_tool(lookup, {"type": "object", "properties": {"a": {"type": "wrong"}}}, description="x")
    with pytest.raises(GlmkitError, match="of type 'object'"):
        schema_tool(lookup, {"type": "string"}, description="x")


def test_return_values_become_text():
    class Point(BaseModel):
        x: int
        y: int

    @dataclass
    class Box:
        name: str

    reg = FunctionRegistry()

    @reg.tool
    def point() -> Point:
        """A point."""
        return Point(x=1, y=2)

    @reg.tool(name="box")
    def make_box() -> Box:
        """A box."""
        return Box("盒子")

    @reg.tool
    def nothing() -> None:
        """Nothing."""

    assert [reg.call(n, "{}").content for n in ("point", "box", "nothing")] == ['{"x": 1, "y": 2}',
                                                                                 '{"name": "盒子"}', ""]
    assert reg.names == ["point", "box", "nothing"]
    assert [s["function"]["name"] for s in reg.specs()] == reg.names


def test_declaration_errors_name_the_fix():
    def untyped(city) -> str:
        """Doc."""
        return city

    def undocumented(city: str) -> str:
        return city

    def star(*cities: str) -> str:
        """Doc."""
        return ""

    with pytest.raises(GlmkitError, match="parameter 'city' has no type hint"):
        function_tool(untyped)
    with pytest.raises(GlmkitError, match="has no docstring"):
        function_tool(undocumented)
    assert function_tool(undocumented, description="Echo a city.").description == "Echo a city."
    with pytest.raises(GlmkitError, match=r"\*cities"):
        function_tool(star)
    with pytest.raises(GlmkitError, match="not allowed"):
        function_tool(get_weather, name="get weather")
    with pytest.raises(GlmkitError, match="two tools are named 'get_weather'"):
        FunctionRegistry([get_weather, get_weather])


def test_bound_methods_are_tools():
    class Counter:
        def __init__(self):
            self.n = 0

        def add(self, k: int) -> int:
            """Add k to the counter."""
            self.n += k
            return self.n

    c = Counter()
    reg = FunctionRegistry([c.add])
    assert reg["add"].parameters == {"type": "object", "properties": {"k": {"type": "integer"}}, "required": ["k"]}
    assert reg.call("add", '{"k": 5}').content == "5" and c.n == 5


def test_load_functions_from_a_user_file(tmp_path):
    f = tmp_path / "my_tools.py"
    f.write_text('from math import sqrt\n\n'
                 'def area(w: float, h: float) -> float:\n    """Area of a rectangle."""\n    return w * h\n\n'
                 'def _helper() -> None:\n    pass\n\n'
                 'def root(x: float) -> float:\n    """Square root."""\n    return sqrt(x)\n')
    tools = load_functions(f)
    assert [t.name for t in tools] == ["area", "root"]  # sqrt is imported, _helper private
    assert isinstance(tools[0], Tool) and FunctionRegistry(tools).call("area", '{"w": 2, "h": 3}').content == "6.0"

    f.write_text(f.read_text() + "\nTOOLS = [root]\n")
    assert [t.name for t in load_functions(f)] == ["root"]


def test_user_file_with_postponed_annotations_and_a_model_parameter(tmp_path):
    f = tmp_path / "trips.py"
    f.write_text('''from __future__ import annotations
from typing import Literal
from pydantic import BaseModel, Field

class Trip(BaseModel):
    """A trip."""
    city: str = Field(description="Where to")
    nights: int = 1

def book(trip: Trip, mode: Literal["train", "plane"] = "train") -> str:
    """Book a trip.

    Args:
        trip: The trip to book.
    """
    return f"{trip.city}/{trip.nights}/{mode}/{type(trip).__name__}"
''')
    (tool,) = load_functions(f)  # Trip is a class and Field is imported: neither is a tool
    assert tool.parameters == {
        "type": "object",
        "properties": {"trip": {"description": "The trip to book.", "$ref": "#/$defs/Trip"},
                       "mode": {"type": "string", "default": "train", "enum": ["train", "plane"]}},
        "required": ["trip"],
        "$defs": {"Trip": {"type": "object", "description": "A trip.",
                           "properties": {"city": {"type": "string", "description": "Where to"},
                                          "nights": {"type": "integer", "default": 1}},
                           "required": ["city"]}},
    }
    reg = FunctionRegistry([tool])
    assert reg.call("book", '{"trip": {"city": "西安", "nights": 2}, "mode": "plane"}').content == "西安/2/plane/Trip"
    assert reg.call("book", '{"trip": {"nights": "x"}}').content == (
        "error: invalid arguments for book: trip.city: missing (required); "
        'trip.nights: input should be a valid integer, unable to parse string as an integer (got "x")')


@pytest.mark.parametrize("text, message", [
    ("def f(:\n", r"my_tools.py:1: syntax error"),
    ("raise RuntimeError('no key')\n", r"importing it raised RuntimeError: no key"),
    ("x = 1\n", r"defines no tool"),
    ("TOOLS = 'area'\n", r"TOOLS must be a list"),
    ("def f(a):\n    '''Doc.'''\n", r"my_tools.py: function f: parameter 'a' has no type hint"),
])
def test_load_functions_errors(tmp_path, text, message):
    f = tmp_path / "my_tools.py"
    f.write_text(text)
    with pytest.raises(GlmkitError, match=message):
        load_functions(f)


def test_load_functions_missing_file(tmp_path):
    with pytest.raises(GlmkitError, match="no such file"):
        load_functions(tmp_path / "absent.py")
    (tmp_path / "tools.txt").write_text("")
    with pytest.raises(GlmkitError, match=r"not a \.py file"):
        load_functions(tmp_path / "tools.txt")


def test_specs_are_json():
    assert json.loads(json.dumps(FunctionRegistry([get_weather, numpy_style]).specs()))[1]["function"]["name"] \
        == "numpy_style"
