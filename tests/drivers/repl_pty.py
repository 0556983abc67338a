"""Drives `tarpo repl` through a pseudo-terminal as a user would.

Usage: repl_pty.py BINARY MODEL_DIR HISTORY_FILE
Exits non-zero with the transcript when an expectation fails.
"""
import os
import pty
import select
import sys
import time

binary, model, history = sys.argv[1:4]
pid, fd = pty.fork()
if pid == 0:
    os.environ["TARPO_HISTORY"] = history
    os.environ["TERM"] = "xterm"
    os.execv(binary, [binary, "repl", "--model", model])

transcript = b""
pending = b""


def fail(msg):
    sys.stderr.write(f"{msg}\n--- transcript ---\n{transcript.decode(errors='replace')}\n")
    sys.exit(1)


def expect(pattern, timeout=120):
    """Reads until `pattern` has been output; consumes through it."""
    global pending, transcript
    pattern = pattern.encode()
    end = time.time() + timeout
    while pattern not in pending:
        left = end - time.time()
        ready, _, _ = select.select([fd], [], [], max(0.0, left))
        if not ready:
            fail(f"timed out waiting for {pattern!r}")
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            fail(f"the REPL exited while waiting for {pattern!r}")
        pending += chunk
        transcript += chunk
    pending = pending[pending.index(pattern) + len(pattern):]


def prompt():
    """Waits for a fresh prompt: rustyline turns bracketed paste on (ESC[?2004h)
    when a new line starts, not when it redraws a multi-line input, and keys
    sent before that are lost when it enters raw mode."""
    expect("\x1b[?2004h")
    expect("tarpo> ")


def send(text):
    os.write(fd, text.encode())


prompt()  # after the preloaded `let m = load_backbone(...)`
send("m.info.layers\r")
expect("2\r\n")
prompt()

# Definitions persist across lines (variables and functions).
send("let x = 40;\r")
prompt()
send("fn twice(v) { v * 2 }\r")
prompt()
send("twice(x) + 2\r")
expect("82")
prompt()

# Tab completes a primitive's name.
send("compute_adv\t")
expect("compute_advantages")
send("([1.0, 0.0], #{group: 2})\r")
expect("0.7070")
prompt()

# After `m.`, completion offers the Backbone's methods only (`t` -> tokenize,
# where the flat list has text, texts, tokens, tokenize, true, ...).
send("m.t\t")
expect("m.tokenize")
send("(\"12\").len()\r")
expect("1\r\n")
prompt()

# A multi-line for loop: input continues while the brace is open.
send("let s = 0;\r")
prompt()
send("for i in 0..5 {\r")
send("  s += i;\r")
send("}\r")
prompt()
send("s * 100\r")
expect("1000")
prompt()

# An error leaves the session usable.
send("no_such_variable + 1\r")
expect("error: <repl>:1:1")
prompt()
send("x + 1\r")
expect("41")
prompt()

# A runaway loop stops at the array limit (in seconds, not at the machine's
# memory); earlier variables and functions survive and new lines run.
send("let a = []; loop { a.push(1) }\r")
expect("array grew past 100000 elements (the limit; raise it with --max-array N, 0 for none)", timeout=60)
prompt()
send("twice(x) + 1\r")
expect("81")
prompt()
send("let b = [1, 2, 3]; b.len() * 10\r")
expect("30")
prompt()

# A misspelled option key lists the valid ones.
send("compute_advantages([1.0], #{grop: 1})\r")
expect("valid options: estimator, group")
prompt()

# Ctrl-C stops a running loop; the state is kept.
send("let n = 0; loop { n += 1; }\r")
time.sleep(1.5)
send("\x03")
expect("interrupted")
prompt()
send("n > 1000\r")
expect("true")
prompt()

# A frame prints as an aligned table with its shape, long ones truncated.
send('to_frame([#{run: "a", reward: 0.5}, #{run: "b", reward: 0.25}])\r')
expect("reward  run")
expect("0.2500  b")
expect("2 rows × 2 columns")
prompt()
send('let big = []; for i in 0..100 { big.push(#{i: i}); } to_frame(big)\r')
expect("…")
expect("99")
expect("100 rows × 1 column")
prompt()

# Commands.
send(":vars\r")
expect("m: Backbone\r\n")
expect("x: i64 = 40")
prompt()

# Ctrl-D exits cleanly.
send("\x04")
_, status = os.waitpid(pid, 0)
if os.WEXITSTATUS(status) != 0:
    fail(f"exit status {os.WEXITSTATUS(status)}")
saved = open(history).read()
if "let x = 40;" not in saved:
    fail(f"history not saved: {saved!r}")
print("repl: ok")
