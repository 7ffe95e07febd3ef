"""Ctrl-C: exit 130 and one line, no traceback (with or without decoding workers), a valid manifest,
no partial files, and a model left without hooks when the library is interrupted.

The subprocess runs the installed ``hookviz`` script (tests/process_helpers.py), made to hang after
a number of batches so that it is certainly still running when the signal arrives.

    hookviz gradcam nets:build_batchnet photos/ --size 32 -l relu2 --json -o OUT
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch
from cli_helpers import BATCHNET, GRADCAM, assert_no_partial_files, image_folder, inputs_of, json_lines, read_manifest
from process_helpers import running, stop, subprocess_env, wait_for_records

from hookviz.batch import BatchOptions, plan_batch
from hookviz.jobs import CamJob, CamOptions
from hookviz.models import load_model


def test_ctrl_c_exits_130_without_a_traceback(project):
    """SIGINT to a running `hookviz gradcam` (to its process group, as a terminal's Ctrl-C does): exit 130,
    `hookviz: interrupted` on stderr, no traceback, a valid manifest, no temp files, complete PNGs.

    --workers 0: with decoding workers a traceback can appear, see the test below."""
    image_folder(project / "photos", 40)
    out = project / "out"
    args = [*GRADCAM, "photos", "--batch-size", "2", "--workers", "0", "--json", "-o", "out"]

    # 40 inputs in batches of 2 are 20 forward passes, and the 11th never returns: when Ctrl-C arrives the run has
    # recorded 16 to 20 inputs and is certainly not finished, on a fast machine as on a busy one.
    with running(project, args, log=project / "interrupted", hang_after=10) as process:
        wait_for_records(process, out, count=3)
        status = stop(process, signal.SIGINT)

    stderr = (project / "interrupted.err").read_text()
    assert status == 130, stderr
    assert stderr.splitlines()[-1] == "hookviz: interrupted"
    assert "Traceback" not in stderr
    recorded = inputs_of(read_manifest(out))
    assert 3 <= len(recorded) < 40
    assert json_lines((project / "interrupted.out").read_text()) == [
        {key: value for key, value in entry.items() if key not in ("type", "run")} for entry in recorded
    ]
    assert_no_partial_files(out)


# Ctrl-C at one precise moment: while the main process receives a decoded image from a DataLoader worker.
# Tensors would travel as file descriptors over a connection to the worker's multiprocessing resource_sharer
# thread, which printed a traceback when Ctrl-C cut the hand-over (seen about 1 run in 10 with --workers 1);
# hookviz sends arrays by value instead, and the script counts the file-descriptor hand-overs.
CTRL_C_WHILE_RECEIVING = textwrap.dedent(
    """
    import multiprocessing.connection as connection
    import os
    import sys

    from torch.utils.data import dataloader

    MAIN, calls, try_get_data = os.getpid(), 0, dataloader._MultiProcessingDataLoaderIter._try_get_data
    fd_transfers = 0
    answer_challenge = connection.answer_challenge

    def counting_answer_challenge(*args, **kwargs):  # used when a tensor travels as a file descriptor
        global fd_transfers
        fd_transfers += 1
        return answer_challenge(*args, **kwargs)

    def ctrl_c_while_receiving(self, *args, **kwargs):
        global calls
        calls += 1
        if calls == 4:
            print(f"fd transfers before Ctrl-C: {fd_transfers}", file=sys.stderr)
            raise KeyboardInterrupt
        return try_get_data(self, *args, **kwargs)

    connection.answer_challenge = counting_answer_challenge
    dataloader._MultiProcessingDataLoaderIter._try_get_data = ctrl_c_while_receiving
    sys.argv = ["hookviz", *sys.argv[1:]]
    from hookviz.cli import main
    main()
    """
)


def test_ctrl_c_with_decoding_workers_prints_no_traceback(project):
    image_folder(project / "photos", 20)
    (project / "ctrl_c.py").write_text(CTRL_C_WHILE_RECEIVING)

    completed = subprocess.run(
        [sys.executable, "ctrl_c.py", *GRADCAM, "photos", "--batch-size", "2", "--workers", "1", "--json", "-o", "out"],
        cwd=project,
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )

    assert completed.returncode == 130, completed.stderr
    assert "hookviz: interrupted" in completed.stderr
    assert "Traceback" not in completed.stderr, completed.stderr
    # Decoded images come back by value: no file-descriptor hand-over that Ctrl-C could cut in half.
    assert "fd transfers before Ctrl-C: 0" in completed.stderr


def test_keyboard_interrupt_in_the_library_leaves_the_model_clean(project, tmp_path):
    """Ctrl-C during the 3rd batch (raised inside the model's forward pass) propagates out of iterating
    `plan_batch(...).records`; no hook stays on the model, the writer thread is gone, and the manifest
    records exactly the inputs whose records were handed out."""
    images = image_folder(project / "photos", 10)
    loaded = load_model(BATCHNET, size=(32, 32), device="cpu")
    loaded.module.interrupt_on_call = 3
    job = CamJob(loaded, CamOptions(out_dir=tmp_path / "out", layer="relu2"))
    run = plan_batch(images, loaded, job, BatchOptions(out_dir=tmp_path / "out", batch_size=2))

    finished = []
    with pytest.raises(KeyboardInterrupt):
        for record in run.records:
            finished.append(record)

    assert loaded.module.calls == 3 and len(finished) <= 4
    for name, module in loaded.module.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, f"hook left on {name or 'the model'}"
        assert not module._backward_hooks
    assert torch.is_grad_enabled()
    assert not [thread.name for thread in threading.enumerate() if thread.name.startswith("hookviz-writer")]
    header, *recorded = read_manifest(tmp_path / "out")
    assert header["inputs"] == 10
    assert recorded == [{"type": "input", "run": header["run"], **record.as_json()} for record in finished]
    assert_no_partial_files(tmp_path / "out")
