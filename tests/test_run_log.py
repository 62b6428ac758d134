"""The run's log file: every library's records in it while a run lasts, nothing after; file-only
details kept off the terminal's progress lines."""

import logging

from rmscale import run_log


def test_log_file_takes_every_library_record_while_the_run_lasts(tmp_path):
  root = logging.getLogger()
  level, handlers = root.level, list(root.handlers)
  root.setLevel(logging.WARNING)  # As Python starts: INFO records would be dropped before handlers.
  try:
    with run_log.log_file(str(tmp_path / "run")) as log:
      logging.getLogger("orbax.checkpoint").info("saved step 3")
      logging.getLogger("rmscale.pipeline").info("stage gold: done")
      logging.getLogger("jax").debug("below INFO: not kept")
      assert log.path == str(tmp_path / "run" / "logs" / "run.log")
    logging.getLogger("orbax.checkpoint").info("after the run: not kept")
    assert root.level == logging.WARNING and root.handlers == handlers
  finally:
    root.setLevel(level)
  text = (tmp_path / "run" / "logs" / "run.log").read_text()
  assert "orbax.checkpoint" in text and "saved step 3" in text and "stage gold: done" in text
  assert "below INFO" not in text and "after the run" not in text


def test_a_resumed_run_appends_and_other_processes_have_their_own_file(tmp_path):
  for i, msg in enumerate(("first invocation", "second invocation")):
    with run_log.log_file(str(tmp_path)):
      logging.getLogger("rmscale").warning(msg)
  with run_log.log_file(str(tmp_path), process_index=3):
    logging.getLogger("rmscale").warning("process three")
  text = (tmp_path / "logs" / "run.log").read_text()
  assert text.index("first invocation") < text.index("second invocation")
  assert "process three" not in text
  assert "process three" in (tmp_path / "logs" / "run.p3.log").read_text()


def test_progress_lines_leave_out_warnings_and_file_only_details():
  keep = run_log._Progress().filter
  rec = lambda level, **extra: logging.makeLogRecord({"levelno": level, "msg": "m", **extra})  # noqa: E731
  assert keep(rec(logging.INFO))
  assert not keep(rec(logging.INFO, **run_log.FILE_ONLY))
  assert not keep(rec(logging.WARNING))  # Shown once, by absl's handler.
