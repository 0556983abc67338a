"""Drives `m.stream` in `tarpo repl` through a pseudo-terminal: the soft
tokens the rollout records are the ones printed in colour, in order, and
Ctrl-C ends a long completion, keeping what was written.

Usage: stream_pty.py BINARY LONG_MODEL_DIR
(the colour check runs on the embedded default model, Ctrl-C on LONG_MODEL_DIR)
Exits non-zero with the transcript when an expectation fails.
"""
import os
import pty
import re
import select
import sys
import time

SOFT_ON = "\x1b[30;48;5;215m"
OFF = "\x1b[0m"


class Repl:
    def __init__(self, binary, args):
        self.pid, self.fd = pty.fork()
        if self.pid == 0:
            os.environ["TERM"] = "xterm"
            os.environ.pop("NO_COLOR", None)
            os.execv(binary, [binary, "repl", *args])
        self.transcript = b""
        self.pending = b""

    def fail(self, msg):
        sys.stderr.write(f"{msg}\n--- transcript ---\n{self.transcript.decode(errors='replace')}\n")
        sys.exit(1)

    def expect(self, pattern, timeout=180):
        """Reads until `pattern` has been output; returns what came before it."""
        pattern = pattern.encode()
        end = time.time() + timeout
        while pattern not in self.pending:
            left = end - time.time()
            ready, _, _ = select.select([self.fd], [], [], max(0.0, left))
            if not ready:
                self.fail(f"timed out waiting for {pattern!r}")
            try:
                chunk = os.read(self.fd, 4096)
            except OSError:
                self.fail(f"the REPL exited while waiting for {pattern!r}")
            self.pending += chunk
            self.transcript += chunk
        i = self.pending.index(pattern)
        before = self.pending[:i]
        self.pending = self.pending[i + len(pattern):]
        return before.decode(errors="replace")

    def prompt(self):
        # A fresh line turns bracketed paste on before the prompt (see repl_pty.py).
        self.expect("\x1b[?2004h")
        self.expect("tarpo> ")

    def send(self, text):
        os.write(self.fd, text.encode())

    def line(self, code):
        """Runs one line and returns its output up to the next prompt."""
        self.send(code + "\r")
        self.expect("\r\n")  # the echoed input
        out = self.expect("\x1b[?2004h")
        self.expect("tarpo> ")
        return out

    def quit(self):
        self.send("\x04")
        os.waitpid(self.pid, 0)


binary, long_model = sys.argv[1:3]

# 1. Colour at exactly the recorded soft positions (default model, a router
#    that goes soft about half the time).
r = Repl(binary, [])
r.prompt()
r.line("attach_router(m, #{init_soft: 0.5, seed: 3});")
r.send('let ro = m.stream("Tom has 3 apples and buys 4 more.", #{max_new: 40, temperature: 1.0, seed: 11});\r')
r.expect("Ctrl-C stops]")
streamed = r.expect("\x1b[?2004h")
r.expect("tarpo> ")
modes = r.line('let s = "MODES "; for t in ro.records(0) { s += if t.mode == "soft" { "S" } else { "H" }; } print(s);')
soft = r.line('let s = "SOFT "; for t in ro.records(0) { if t.mode == "soft" { s += "<<" + t.text + ">>"; } } print(s);')
r.quit()

modes = re.search(r"MODES ([SH]+)", modes)
soft = re.search(r"SOFT (.*)", soft)
if not modes or not soft:
    r.fail("the rollout's modes were not printed")
n_soft = modes.group(1).count("S")
want = re.findall(r"<<(.*?)>>", soft.group(1).rstrip("\r"))
got = re.findall(re.escape(SOFT_ON) + r"(.*?)" + re.escape(OFF), streamed, re.S)
if n_soft < 3:
    r.fail(f"only {n_soft} soft tokens: the check needs several")
if len(want) != n_soft or got != want:
    r.fail(f"coloured spans {got!r} are not the recorded soft tokens {want!r} ({n_soft} soft)")
print(f"stream: {n_soft} soft tokens coloured, {len(modes.group(1))} in all")

# 2. Ctrl-C ends a long completion and keeps it.
r = Repl(binary, ["--model", long_model])
r.prompt()
r.line("attach_router(m, #{init_soft: 0.2});")
r.send('let ro = m.stream("Write a long story about a dragon who learns to count.", #{max_new: 2000, temperature: 0.8, seed: 2});\r')
r.expect("Ctrl-C stops]")
r.expect(" ")  # some text has come
time.sleep(1.0)
r.send("\x03")
kept = r.expect("tokens kept)")
r.prompt()
n = re.search(r"\(stopped: (\d+)", kept)
if not n:
    r.fail("no stop message")
length = r.line("print(`LEN ${ro.lengths[0]}`);")
got = re.search(r"LEN (\d+)", length)
if not got or got.group(1) != n.group(1) or not (0 < int(n.group(1)) < 2000):
    r.fail(f"the kept rollout has {got and got.group(1)} tokens, the stop message said {n.group(1)}")
r.line('print("still alive");')
r.quit()
print(f"stream: Ctrl-C kept {n.group(1)} tokens")
print("stream: ok")
