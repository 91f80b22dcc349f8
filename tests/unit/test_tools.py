"""Tools: schemas, call parsing, execution with timeouts, calculator, the python sandbox, BM25 search."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import socket
import sys
import time
import types

import pytest

from lmpo.errors import ConfigError
from lmpo.tools import (
    InvalidCall,
    Sandbox,
    ToolCall,
    ToolSet,
    assistant_message,
    build_tools,
    calculator,
    sandbox_isolation,
    tool_schema,
)


def get_weather(city: str, days: int = 1, unit: str = "celsius") -> str:
    """Get the weather forecast for a city.

    Args:
        city: The city name.
        days: How many days ahead.
        unit: The temperature unit. (choices: ["celsius", "fahrenheit"])
    """
    return f"{city}: sunny for {days} day(s), 21 {unit}"


def slow(seconds: float) -> str:
    """Sleep, then answer.

    Args:
        seconds: How long to sleep.
    """
    time.sleep(seconds)
    return "done"


def crash() -> str:
    """Always raises."""
    raise RuntimeError("tool broke")


def structured(n: int) -> dict:
    """Return a dict and a long text.

    Args:
        n: Length of the text.
    """
    return {"n": n, "text": "z" * n}


def call(name: str, **arguments) -> str:
    return f'<tool_call>\n{json.dumps({"name": name, "arguments": arguments})}\n</tool_call>'


# ---- schemas -------------------------------------------------------------------------------------------------------


def test_schema_from_type_hints_and_docstring():
    schema = tool_schema(get_weather)
    fn = schema["function"]
    assert schema["type"] == "function" and fn["name"] == "get_weather"
    assert fn["description"] == "Get the weather forecast for a city."
    props = fn["parameters"]["properties"]
    assert props["city"] == {"type": "string", "description": "The city name."}
    assert props["days"]["type"] == "integer" and props["unit"]["enum"] == ["celsius", "fahrenheit"]
    assert fn["parameters"]["required"] == ["city"]


def test_schema_of_an_undocumented_function_is_a_clear_error():
    def nodoc(x: int) -> int:
        return x

    with pytest.raises(ConfigError, match="nodoc.*docstring"):
        tool_schema(nodoc)


def test_builtin_schemas_render_through_apply_chat_template():
    from lmpo.models.tiny import build_tiny_tokenizer

    template = (
        "{% for t in tools %}TOOL {{ t | tojson }}\n{% endfor %}"
        "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    )
    tools = build_tools(["calculator", "python", "search"])
    text = build_tiny_tokenizer().apply_chat_template(
        [{"role": "user", "content": "hi"}], tools=tools.schemas, chat_template=template, tokenize=False
    )
    rendered = [json.loads(line[5:]) for line in text.splitlines() if line.startswith("TOOL ")]
    assert [t["function"]["name"] for t in rendered] == ["calculator", "python", "search"]
    assert rendered == tools.schemas


# ---- parsing and responding ----------------------------------------------------------------------------------------


@pytest.fixture
def tools():
    return ToolSet([get_weather, calculator, slow, crash, structured], timeout=0.5, max_result_chars=50)


def test_parse_good_and_several_calls(tools):
    reply = "Let me check. " + call("get_weather", city="Oslo") + " and " + call("calculator", expression="6*7")
    calls = tools.parse(reply)
    assert calls == [ToolCall("get_weather", {"city": "Oslo"}), ToolCall("calculator", {"expression": "6*7"})]
    turn = tools.respond(reply)
    assert turn.messages == [
        {"role": "tool", "name": "get_weather", "content": "Oslo: sunny for 1 day(s), 21 celsius"},
        {"role": "tool", "name": "calculator", "content": "42"},
    ]
    assert turn.metrics["calls"] == 2 and turn.metrics["valid"] == 2 and turn.metrics["invalid"] == 0
    msg = assistant_message(reply, turn.calls)
    assert msg["content"] == reply and msg["tool_calls"][1]["function"] == {"name": "calculator",
                                                                            "arguments": {"expression": "6*7"}}
    assert tools.parse("no calls here") == [] and tools.respond("plain answer").messages == []


def test_arguments_given_as_a_json_string_are_accepted(tools):
    reply = '<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1+1\\"}"}</tool_call>'
    assert tools.respond(reply).messages[0]["content"] == "2"


@pytest.mark.parametrize(
    "reply, kind, says",
    [
        ("<tool_call>{not json}</tool_call>", "malformed", "not valid JSON"),
        ('<tool_call>["calculator"]</tool_call>', "malformed", '"name"'),
        ('<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>', "malformed", "JSON object"),
        ('<tool_call>{"name": "calculator", "arguments": {"expression": "1"}}', "malformed", "closing"),
        (call("get_wether", city="Oslo"), "unknown_tool", "unknown tool 'get_wether'; available tools: calculator"),
        (call("get_weather", city=3), "bad_arguments", "'city' must be of type string"),
        (call("get_weather", city="Oslo", days="two"), "bad_arguments", "'days' must be of type integer"),
        (call("get_weather", city="Oslo", days=True), "bad_arguments", "'days' must be of type integer"),
        (call("get_weather", city="Oslo", unit="kelvin"), "bad_arguments", "must be one of"),
        (call("get_weather"), "bad_arguments", "missing required argument(s) city"),
        (call("get_weather", city="Oslo", country="NO"), "bad_arguments", "unknown argument 'country'"),
    ],
)
def test_invalid_calls_are_observations_and_counted(tools, reply, kind, says):
    (parsed,) = tools.parse(reply)
    assert isinstance(parsed, InvalidCall) and parsed.kind == kind and says in parsed.message
    turn = tools.respond(reply)
    assert turn.messages[0]["role"] == "tool" and turn.messages[0]["content"].startswith("invalid call: ")
    assert turn.metrics["invalid"] == 1 and turn.metrics[kind] == 1 and turn.metrics["valid"] == 0


def test_mixed_valid_and_invalid_calls_keep_their_order(tools):
    reply = call("calculator", expression="2+2") + "<tool_call>{oops</tool_call>" + call("nope")
    turn = tools.respond(reply)
    assert [m["content"][:13] for m in turn.messages] == ["4", "invalid call:", "invalid call:"]
    assert turn.metrics == {**turn.metrics, "calls": 3, "valid": 1, "invalid": 2, "malformed": 1, "unknown_tool": 1}


def test_tool_errors_timeouts_and_non_text_results_never_raise(tools):
    start = time.monotonic()
    turn = tools.respond(call("slow", seconds=5) + call("crash") + call("structured", n=100))
    assert time.monotonic() - start < 3
    timeout, crashed, big = (m["content"] for m in turn.messages)
    assert timeout == "error: slow timed out after 0.5 s."
    assert crashed == "error: crash raised RuntimeError: tool broke"
    assert big.startswith('{"n": 100, "text": "zzz') and "[... truncated" in big
    assert turn.metrics["timeouts"] == 1 and turn.metrics["errors"] == 1 and turn.metrics["valid"] == 3


def test_build_tools_by_name_and_module_path(monkeypatch):
    mod = types.ModuleType("my_tools")
    mod.get_weather, mod.NUMBER = get_weather, 3
    monkeypatch.setitem(sys.modules, "my_tools", mod)
    assert build_tools(["calculator", "my_tools:get_weather"]).names == ["calculator", "get_weather"]
    with pytest.raises(ConfigError, match='Did you mean "calculator"'):
        build_tools(["calculater"])
    with pytest.raises(ConfigError, match="not a function"):
        build_tools(["my_tools:NUMBER"])
    with pytest.raises(ConfigError, match="unique"):
        build_tools(["calculator", calculator])


# ---- calculator ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "expression, result",
    [
        ("0.1 + 0.2", "0.3"),
        ("1/3 * 3", "1"),
        ("(12.5 + 7) * 3 / 4", "14.625"),
        ("2**100", "1267650600228229401496703205376"),
        ("-7 // 2", "-4"),
        ("17 % 5", "2"),
        ("sqrt(144) + 2^3", "20"),
        ("sqrt(2)", "1.41421356237"),
        ("1/3", "0.333333333333"),
        ("max(3, 4.5) - min(1, -2)", "6.5"),
        ("123456789 * 987654321", "121932631112635269"),
    ],
)
def test_calculator_is_exact(expression, result):
    assert calculator(expression) == result


@pytest.mark.parametrize(
    "expression, says",
    [
        ("__import__('os').system('ls')", "not arithmetic"),
        ("open('/etc/passwd').read()", "not arithmetic"),
        ("x + 1", "not arithmetic"),
        ("'a' * 3", "not arithmetic"),
        ("(1).__class__", "not arithmetic"),
        ("[1, 2]", "not arithmetic"),
        ("lambda: 1", "not arithmetic"),
        ("1 +", "not a valid expression"),
        ("1 / 0", "division by zero"),
        ("9**9**9", "exponent too large"),
        ("1" * 400, "at most"),
    ],
)
def test_calculator_refuses_anything_but_arithmetic(expression, says):
    start = time.monotonic()
    with pytest.raises(ValueError, match=says):
        calculator(expression)
    assert time.monotonic() - start < 1


# ---- python sandbox ------------------------------------------------------------------------------------------------

# The wall clock is far above the CPU limit: on a busy machine (a load of 16 on 2 cores) starting the sandboxed
# interpreter alone took more than 3 s. Only the sleeper case shortens it (SLEEPER).
SANDBOX = Sandbox(cpu_seconds=1, wall_seconds=60, memory_mb=256, max_output_chars=400, max_output_bytes=100_000)
SLEEPER = dataclasses.replace(SANDBOX, wall_seconds=3)


def run(code: str, sandbox: Sandbox = SANDBOX):
    start = time.monotonic()
    result = sandbox.run(code)
    assert time.monotonic() - start < sandbox.wall_seconds + 5  # every case ends by the limits, whatever the code does
    return result


def test_sandbox_runs_code_in_a_fresh_temp_dir_that_is_removed():
    result = run("import os\nopen('note.txt', 'w').write('hi')\nprint(open('note.txt').read(), os.getcwd())")
    assert result.error is None and result.returncode == 0
    text, cwd = result.stdout.split()
    assert text == "hi" and "lmpo-sandbox-" in cwd and not os.path.exists(cwd)
    assert run("import math\nprint(math.factorial(20))").text() == "2432902008176640000"


def test_sandbox_contains_a_fork_bomb():
    result = run("import os\nwhile True:\n    os.fork()")
    assert result.error and "os.fork is not allowed" in result.stderr
    result = run("import subprocess\nsubprocess.run(['sh', '-c', ':(){ :|:& };:'])")
    assert "not allowed" in result.stderr
    result = run("import ctypes\nctypes.CDLL(None).fork()")
    assert "not allowed" in result.stderr


def test_sandbox_stops_an_infinite_loop_at_the_cpu_limit():
    # a wall clock far above the CPU limit: on a busy machine 1 s of CPU can take several seconds of wall time
    # (under a load of 16 on 2 cores it took over 3), and the CPU limit must still be the one that stops the loop
    start = time.monotonic()
    result = SANDBOX.run("while True:\n    pass")
    assert "CPU-time limit of 1 s exceeded" in result.text()
    assert time.monotonic() - start < SANDBOX.wall_seconds


def test_sandbox_stops_a_sleeper_at_the_wall_clock_limit():
    result = run("import time\ntime.sleep(60)", SLEEPER)
    assert "wall-clock limit of 3 s exceeded" in result.text()


def test_sandbox_refuses_a_10_gb_allocation():
    result = run("x = bytearray(10 * 1024**3)\nprint(len(x))")
    assert "MemoryError" in result.stderr and "memory limit of 256 MB exceeded" in result.text()


def test_sandbox_refuses_writes_outside_its_directory(tmp_path):
    outside = [tmp_path / "escape.txt", "/tmp/lmpo-sandbox-escape-test.txt"]
    for target in outside:
        result = run(f"open({str(target)!r}, 'w').write('x')")
        assert "is not allowed (only inside" in result.stderr
        result = run(f"import os\nos.open({str(target)!r}, os.O_WRONLY | os.O_CREAT)")
        assert "is not allowed" in result.stderr
        assert not os.path.exists(target)
    result = run(f"import os\nos.remove({str(tmp_path)!r})")
    assert "os.remove" in result.stderr and tmp_path.exists()


def test_sandbox_has_no_network():
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    port = server.getsockname()[1]
    try:
        result = run(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=1)\nprint('connected')")
        assert "connected" not in result.stdout and "socket" in result.stderr
    finally:
        server.close()
    assert sandbox_isolation() in ("namespaces+readonly", "namespaces", "audit-hook")


def test_sandbox_truncates_a_flood_of_output():
    result = run("while True:\n    print('x' * 1000)")
    assert len(result.stdout) < 500 and "output truncated" in result.stdout
    assert "output limit" in result.text()


def test_python_tool_through_a_toolset():
    tools = ToolSet([SANDBOX.as_tool()], timeout=10)
    turn = tools.respond(call("python", code="print(sum(i * i for i in range(10)))"))
    assert turn.messages == [{"role": "tool", "name": "python", "content": "285"}]


# ---- search --------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "query, title",
    [
        ("How tall is the Grey Needle lighthouse?", "Grey Needle"),
        ("Who was the first president of Teskar?", "History of Teskar"),
        ("deepest point of the Orven Sea", "Orven Sea"),
        ("who climbed Mount Karsk first", "Mount Karsk"),
        ("how long is the Kroll river", "Kroll River"),
        ("puffins nesting", "Teskar puffins"),
    ],
)
def test_bm25_search_finds_the_passage(query, title):
    pytest.importorskip("bm25s")
    from lmpo.tools.search import Corpus, search

    assert Corpus.shipped().search(query, k=1)[0][0].title == title
    assert search(query).startswith(f"[1] {title}: ")


def test_search_without_matches_and_a_custom_corpus():
    pytest.importorskip("bm25s")
    from lmpo.tools.search import Corpus, Passage, make_search_tool, search

    assert search("zebra quantum") == "No passage matches the query."
    corpus = Corpus([Passage("a", "Apples", "Apples are red fruit."), Passage("b", "Sky", "The sky is blue.")])
    assert make_search_tool(corpus)("what colour is the sky", k=1) == "[1] Sky: The sky is blue."
    assert len(Corpus.shipped().passages) >= 30


def test_the_network_namespace_alone_blocks_connections():
    """The kernel layer under the audit hook: a plain child in the sandbox's namespaces cannot reach the host."""
    import subprocess

    from lmpo.tools.sandbox import _namespace_prefix

    if not _namespace_prefix():
        pytest.skip("unshare cannot create namespaces here; the audit hook is the only network barrier")
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    code = f"import socket\nsocket.create_connection(('127.0.0.1', {server.getsockname()[1]}), timeout=2)"
    try:
        proc = subprocess.run([*_namespace_prefix(), sys.executable, "-c", code], capture_output=True, timeout=20)
    finally:
        server.close()
    assert proc.returncode != 0 and b"Network is unreachable" in proc.stderr, proc.stderr[-300:]


def test_tools_prompt_for_templates_without_tool_support():
    from lmpo.models.tiny import build_tiny_tokenizer
    from lmpo.tools import template_renders_tools, tools_system_prompt

    tools = build_tools(["calculator", "search"])
    prompt = tools_system_prompt(tools.schemas, "Be brief.")
    assert prompt.startswith("Be brief.\n\n") and "<tool_call>" in prompt
    listed = prompt.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(line)["name"] for line in listed] == ["calculator", "search"]
    tok = build_tiny_tokenizer()
    assert not template_renders_tools(tok)
    tok.chat_template = "{% if tools %}{{ tools | tojson }}{% endif %}"
    tok.chat_template += "{% for m in messages %}{{ m.content }}{% endfor %}"
    assert template_renders_tools(tok)


def test_the_mount_namespace_alone_blocks_writes_outside_the_work_dir(tmp_path):
    """The kernel layer under the audit hook: outside its working directory the file system is read-only."""
    import subprocess

    from lmpo.tools.sandbox import _namespace_prefix

    if sandbox_isolation() != "namespaces+readonly":
        pytest.skip("no read-only mount namespace here; the audit hook is the only write barrier")
    work = tmp_path / "work"
    work.mkdir()
    code = f"open('inside.txt', 'w').write('x')\nopen({str(tmp_path / 'outside.txt')!r}, 'w')"
    cmd = [*_namespace_prefix(str(work)), sys.executable, "-c", code]
    proc = subprocess.run(cmd, cwd=work, capture_output=True, timeout=20)
    assert b"Read-only file system" in proc.stderr, proc.stderr[-300:]
    assert (work / "inside.txt").read_text() == "x" and not (tmp_path / "outside.txt").exists()


def test_sandboxed_code_cannot_reach_the_hook_or_raise_its_limits():
    result = run("import __main__\nprint(sorted(k for k in vars(__main__) if not k.startswith('__')))")
    assert result.stdout.strip() == "[]"  # the user's own __main__, not the bootstrap's
    result = run("import resource\nresource.setrlimit(resource.RLIMIT_AS, (-1, -1))")
    assert "resource.setrlimit is not allowed" in result.stderr
    result = run("import gc\nprint(len(gc.get_objects()))")
    assert "gc.get_objects is not allowed" in result.stderr


def test_sandbox_runs_are_independent_when_run_concurrently():
    from concurrent.futures import ThreadPoolExecutor

    code = "import os\nopen('n.txt', 'w').write('{i}')\nprint(open('n.txt').read(), len(os.listdir()))"
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda i: SANDBOX.run(code.format(i=i)), range(4)))
    assert [r.stdout.split() for r in results] == [[str(i), "4"] for i in range(4)]  # main.py, 2 logs, n.txt


def test_a_result_that_is_not_json_is_shown_as_text():
    def thing() -> object:
        """Return an object."""
        return object()

    (message,) = ToolSet([thing]).respond(call("thing")).messages
    assert message["content"].startswith("<object object at")


def test_another_call_format_plugs_in_as_a_parser():
    from lmpo.tools import check_arguments

    def bracket_parser(text, schemas):  # e.g. "[calculator(expression=...)]"-style formats of other templates
        calls = []
        for name, arg in re.findall(r"\[(\w+)\((.*?)\)\]", text):
            args = {"expression": arg}
            problem = name in schemas and check_arguments(args, schemas[name]["parameters"])
            calls.append(ToolCall(name, args) if name in schemas and not problem
                         else InvalidCall("unknown_tool", f"invalid call: unknown tool {name!r}.", name))
        return calls

    tools = ToolSet([calculator], parser=bracket_parser)
    turn = tools.respond("[calculator(6*7)] [weather(x)]")
    assert [m["content"] for m in turn.messages] == ["42", "invalid call: unknown tool 'weather'."]


def test_every_shipped_question_is_answered_by_its_passage_and_found_by_search():
    pytest.importorskip("bm25s")
    from lmpo.tools.search import Corpus, shipped_questions

    corpus = Corpus.shipped()
    by_id = {p.id: p for p in corpus.passages}
    questions = shipped_questions()
    assert len(questions) == len(by_id) and {q["passage"] for q in questions} == set(by_id)
    top1 = 0
    for q in questions:
        assert q["answer"].lower() in by_id[q["passage"]].text.lower(), q
        hits = [p.id for p, _ in corpus.search(q["question"], k=3)]
        assert q["passage"] in hits, q  # every question's passage is in the top 3
        top1 += hits[0] == q["passage"]
    assert top1 >= 30  # 31 of 32 at the first place when written
