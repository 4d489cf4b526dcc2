"""`leanfm serve` flag errors: a LeanfmError naming the flag (main() prints it as one `error:` line and exits
1), raised before any model loads."""

import socket
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from leanfm.cli import app
from leanfm.utils.errors import LeanfmError


@pytest.mark.parametrize("args,text", [(["--port", "70000"], "--port"), (["--max-queue", "-1"], "--max-queue"),
                                       (["--max-num-seqs", "0"], "max_num_seqs"), (["--log-level", "loud"], "--log-level"),
                                       (["--shutdown-timeout", "-2"], "--shutdown-timeout")])
def test_bad_flags_fail_before_loading(args, text):
    res = CliRunner().invoke(app, ["serve", "--model", "/nonexistent/model", *args])
    assert isinstance(res.exception, LeanfmError) and text in str(res.exception), res.output


def test_port_in_use_is_one_line():
    code = "import sys; from leanfm.cli import main; sys.argv = ['leanfm', *sys.argv[1:]]; main()"
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        res = subprocess.run([sys.executable, "-c", code, "serve", "--model", "/nonexistent", "--port",
                              str(s.getsockname()[1])], capture_output=True, text=True, timeout=300)
    lines = res.stderr.strip().splitlines()
    assert res.returncode == 1 and len(lines) == 1 and lines[0].startswith("error: cannot listen on"), res.stderr


def test_serve_turns_the_kernels_thread_retreat_off_unless_asked():
    from leanfm.cli_serve import server_thread_policy

    env: dict[str, str] = {}
    server_thread_policy(env)
    assert env == {"LEANFM_ADAPTIVE_THREADS": "0"}
    env = {"LEANFM_ADAPTIVE_THREADS": "1"}
    server_thread_policy(env)
    assert env == {"LEANFM_ADAPTIVE_THREADS": "1"}  # the user's choice stands
