"""Reading prompt/response files: every bad input is a clear error naming the file."""

import pytest

from seamlm.data.files import load_examples
from seamlm.errors import DataError


def test_jsonl_and_csv(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "p1", "response": "r1", "category": "c"}\n\n{"prompt": "p2", "response": "r2"}\n')
    (tmp_path / "a.csv").write_text('prompt,response\n"p, with comma",r1\n')
    j = load_examples(tmp_path / "a.jsonl")
    assert [(e.prompt, e.response, e.category) for e in j] == [("p1", "r1", "c"), ("p2", "r2", None)]
    assert load_examples(tmp_path / "a.csv")[0].prompt == "p, with comma"


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("missing.jsonl", None, "does not exist"),
        ("empty.jsonl", "", "is empty"),
        ("nocol.jsonl", '{"question": "q", "response": "r"}\n', r"lacks column\(s\) \['prompt'\]"),
        ("nocol.csv", "prompt,answer\nq,a\n", r"lacks column\(s\) \['response'\]"),
        ("bad.jsonl", '{"prompt": "q", "response": "r"}\n{oops\n', r"bad.jsonl:2 is not valid JSON"),
        ("blank.jsonl", '{"prompt": "", "response": "r"}\n', "no row with a non-empty"),
        ("data.txt", "hello", "unsupported file type"),
        # a stray quote would swallow the rows after it into one answer
        ("quote.csv", 'prompt,response\nq1,"a1\nq2,a2\nq3,a3\n', "is not valid CSV"),
        ("extra.csv", "prompt,response\nq1,a1\nq2,a, b\n", "row 2 has more fields than the header"),
        # a commented-out header: the first data row would be read as the header ("lacks column(s)")
        ("hash.csv", "# exported 2026-11-28\n#prompt,response\nq1,a1\nq2,a2\n", r"hash.csv:2: the header line starts"),
        ("list.jsonl", '{"prompt": ["hi"], "response": "r"}\n', "row 1 has a list in column 'prompt'"),
        # a later JSON line with other keys is a wrong column, not an "empty response" dropped with a count
        ("keys.jsonl", '{"prompt": "q", "response": "r"}\n{"prompt": "q2", "answer": "a"}\n',
         r"row 2 has no \['response'\] field"),
        ("twice.jsonl", '{"prompt": "q", "response": "r"}\n{"prompt": "a", "response": "b", "prompt": "c"}\n',
         r"twice.jsonl:2: the key 'prompt' is given twice in one object"),
        ("twice.json", '[{"prompt": "q", "response": "r", "response": "s"}]', "the key 'response' is given twice"),
    ],
)
def test_bad_files(tmp_path, name, content, match):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError, match=match) as info:
        load_examples(path)
    assert name in str(info.value)


def test_byte_order_mark_and_unicode_line_separators(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM (the first column is still ``prompt``); a JSON string may hold U+2028,
    which is not a JSONL line break."""
    (tmp_path / "excel.csv").write_bytes("prompt,response\nq,a\n".encode("utf-8-sig"))
    assert [(e.prompt, e.response) for e in load_examples(tmp_path / "excel.csv")] == [("q", "a")]
    (tmp_path / "sep.jsonl").write_text('{"prompt": "line\u2028two", "response": "r\u0085s"}\n', encoding="utf-8")
    assert [(e.prompt, e.response) for e in load_examples(tmp_path / "sep.jsonl")] == [("line\u2028two", "r\u0085s")]


def test_non_utf8(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("prompt,response\ncafé,ok\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        load_examples(path)


def test_dropped_rows_are_counted(tmp_path, caplog):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "q", "response": "r"}\n{"prompt": "q2", "response": ""}\n')
    assert len(load_examples(path)) == 1
    assert "dropped 1 of 2 rows" in caplog.text


def test_a_non_utf8_results_file_is_a_clear_error(tmp_path):
    from seamlm.jsonl import read_records

    path = tmp_path / "results.jsonl"
    path.write_bytes('{"a": "café"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="results.jsonl is not UTF-8"):
        read_records(path)


def test_an_append_waits_for_another_writer_and_a_read_never_sees_half_a_write(tmp_path):
    """Several processes append to one results file: a write in progress is neither cut as a partial tail nor
    read half-done."""
    import fcntl
    import threading
    import time

    from seamlm.jsonl import append_records, read_records

    path = tmp_path / "results.jsonl"
    append_records(path, [{"a": 1}])
    with path.open("a", encoding="utf-8") as writer:
        fcntl.flock(writer, fcntl.LOCK_EX)  # another process mid-write: half its line is out
        writer.write('{"b": ')
        writer.flush()
        read: list = []
        threads = [threading.Thread(target=append_records, args=(path, [{"c": 3}])),
                   threading.Thread(target=lambda: read.extend(read_records(path)))]
        for t in threads:
            t.start()
        time.sleep(0.5)
        assert all(t.is_alive() for t in threads)  # both wait for the writer
        writer.write('2}\n')
        writer.flush()
        fcntl.flock(writer, fcntl.LOCK_UN)
    for t in threads:
        t.join(10)
    assert [r for _, r in read_records(path)] == [{"a": 1}, {"b": 2}, {"c": 3}]
    assert [r for _, r in read] in ([{"a": 1}, {"b": 2}], [{"a": 1}, {"b": 2}, {"c": 3}])


def test_a_lock_file_names_its_holders_and_forgets_those_gone(tmp_path):
    from seamlm.locks import HolderLock

    path = tmp_path / "lock"
    demo = HolderLock(path, "demo")
    assert demo.acquire()
    assert not HolderLock(path, "attack").acquire(shared=True)
    demo.release()
    first, second, rescore = HolderLock(path, "attack"), HolderLock(path, "eval"), HolderLock(path, "rescore")
    assert first.acquire(shared=True) and second.acquire(shared=True)  # side by side; the demo's line is gone
    assert not rescore.acquire()
    assert [h.split(",")[0] for h in rescore.holder().split("; ")] == ["seamlm attack", "seamlm eval"]
    first.release()
    second.release()
    assert rescore.acquire(wait=True) and rescore.holder().startswith("seamlm rescore, pid")
    rescore.release()


def test_a_lone_surrogate_escape_is_a_clear_error_naming_the_row(tmp_path):
    """JSON may escape half of a UTF-16 pair (an emoji cut in two): no UTF-8 file can hold it, so the row is refused
    where it is read, not at the bundle's write."""
    from seamlm.data.files import read_rows

    path = tmp_path / "cut.jsonl"
    path.write_text('{"prompt": "ok", "response": "fine"}\n{"prompt": "hi \\ud83d", "response": "x"}\n')
    with pytest.raises(DataError, match=r"cut.jsonl:2: prompt holds a lone surrogate escape"):
        read_rows(path)
    listed = tmp_path / "cut.json"
    listed.write_text('[{"prompt": "ok", "response": "fine \\udc00"}]')
    with pytest.raises(DataError, match=r"cut.json: object 0: response holds a lone surrogate"):
        read_rows(listed)


def test_a_csv_answer_longer_than_the_csv_modules_default_field_limit_is_read(tmp_path):
    long = "word " * 40_000  # 200,000 characters: over csv's default limit of 131,072
    path = tmp_path / "long.csv"
    path.write_text(f'prompt,response\nq1,a1\nq2,"{long}"\n')
    assert [e.response for e in load_examples(path)] == ["a1", long.strip()]


def test_a_csv_header_naming_a_column_twice_is_refused(tmp_path):
    from seamlm.data.files import read_rows

    path = tmp_path / "twice.csv"
    path.write_text("prompt,response,response\nq,first answer,second answer\n")
    with pytest.raises(DataError, match=r"twice.csv: the header names 'response' more than once"):
        read_rows(path)


def test_a_lock_names_no_holder_of_this_host_that_has_ended(tmp_path):
    """A holder killed without releasing leaves its line; the message names live processes only."""
    import socket
    import subprocess

    from seamlm.locks import HolderLock

    ended = subprocess.Popen(["true"])
    ended.wait()
    path = tmp_path / "lock"
    path.write_text(f"seamlm attack, pid {ended.pid} on {socket.gethostname()}, since 2026-01-01T00:00:00+0000\n"
                    "seamlm attack, pid 1 on another-host, since 2026-01-01T00:00:00+0000\n")
    live = HolderLock(path, "eval")
    assert live.acquire(shared=True)
    holders = HolderLock(path, "demo").holder().split("; ")
    assert [h.split(",")[0] + ("" if "another-host" not in h else " (remote)") for h in holders] == [
        "seamlm attack (remote)", "seamlm eval"]
    live.release()


def test_an_atomic_write_goes_through_a_link_and_never_replaces_a_device_or_folder(tmp_path):
    import os

    from seamlm.errors import ConfigError
    from seamlm.jsonl import write_text_atomic

    shared = tmp_path / "shared" / "benign.jsonl"
    shared.parent.mkdir()
    shared.write_text("old\n")
    link = tmp_path / "out.jsonl"
    link.symlink_to(shared)
    assert write_text_atomic(link, "new\n") == link
    assert link.is_symlink() and shared.read_text() == "new\n"  # the link kept, its target rewritten
    dangling = tmp_path / "later.jsonl"
    dangling.symlink_to(tmp_path / "shared" / "later.jsonl")  # a link to a file not written yet
    write_text_atomic(dangling, "first\n")
    assert dangling.is_symlink() and (tmp_path / "shared" / "later.jsonl").read_text() == "first\n"
    loop = tmp_path / "loop.jsonl"
    loop.symlink_to(loop)
    into_nothing = tmp_path / "nowhere.jsonl"
    into_nothing.symlink_to(tmp_path / "no-such-folder" / "x.jsonl")
    for path, what in ((loop, "a symbolic link that resolves to no file"), (into_nothing, "links to .*no-such-folder")):
        with pytest.raises(ConfigError, match=f"{path} (is )?{what}"):
            write_text_atomic(path, "x\n")
    pipe = tmp_path / "shared" / "pipe"  # as /dev/stdout or /dev/null would be (root may rename over those)
    os.mkfifo(pipe)
    for path, what in ((pipe, "not a regular file"), (tmp_path / "shared", "a folder")):
        with pytest.raises(ConfigError, match=f"{path} is {what}"):
            write_text_atomic(path, "x\n")
    assert pipe.is_fifo()
    assert sorted(p.name for p in (tmp_path / "shared").iterdir()) == ["benign.jsonl", "later.jsonl", "pipe"]  # no temp
