"""Atomic writes and the keys that keep stale outputs from being reused."""

import pytest

from spine.core.io import atomic_path, claim, fingerprint, is_current, mark_current, save_text


def test_atomic_path_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "a.txt"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError
    assert list(tmp_path.iterdir()) == []


def test_claim_drops_outputs_of_other_inputs_and_keeps_a_resume_state(tmp_path):
    out, last = tmp_path / "m.pt", tmp_path / "m.pt.last"
    old, new = fingerprint({"lr": 1}), fingerprint({"lr": 2})
    claim(out, old)
    save_text(last, "epoch 3 of the old run")
    claim(out, old)  # same inputs: an interrupted run keeps its resume state
    assert last.exists() and not is_current(out, old)  # not done until the output exists
    save_text(out, "weights")
    mark_current(out, old)
    assert is_current(out, old) and not is_current(out, new)
    claim(out, new)  # other inputs: the old output and its resume state go
    assert not out.exists() and not last.exists() and not is_current(out, new)
