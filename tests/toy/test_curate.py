"""The toy curation: the oracle's decisions against the scene's exact objects, the accept-all
review of a quick run, and the fix model's server as a subprocess."""

from __future__ import annotations

import pytest

from mmalign.data import toyworld as tw
from mmalign.toy.curate import judge

SCENE = tw.Scene(
    (tw.ToyObject("circle", "red", "large", 0), tw.ToyObject("square", "blue", "small", 5)),
    seed=1,
)
COUNT = "The image shows two objects on a gray background."
RED = "There is a large red circle in the top left."
BLUE = "There is a small blue square in the middle right."


@pytest.mark.parametrize(
    "text, decision",
    [
        (f"{COUNT} {RED} {BLUE} The red circle is to the left of the blue square.", "accepted"),
        # size and position are not checked (the toy's LLM gets positions right about half the time)
        (f"{COUNT} There is a small red circle in the center. {BLUE}", "accepted"),
        (f"{COUNT} {RED}", "rejected"),  # one of the two objects is missing
        (f"{COUNT} {RED} {BLUE} There is a small green triangle in the center.", "edited"),  # not in the scene
        (f"{COUNT} {RED} {RED} {BLUE}", "edited"),  # one red circle, not two
        (f"The image shows three objects on a gray background. {RED} {BLUE}", "edited"),  # wrong count
        (f"{COUNT} {RED} {BLUE} The blue square is to the left of the red circle.", "edited"),  # false relation
        (f"{COUNT} {RED} {BLUE} zero", "rejected"),  # a fragment it cannot read
    ],
)
def test_oracle_decisions(text, decision):
    got, kept, why = judge(text, SCENE)
    assert got == decision, why
    if decision == "edited":  # an edit only deletes, and what is left is accepted as it stands
        before, after = tw.sentences(text), tw.sentences(kept)
        assert len(after) < len(before) and set(after) <= set(before)
        assert judge(kept, SCENE)[0] == "accepted"
    else:
        assert kept == text


def test_the_fix_server_stops_when_the_work_beside_its_start_fails(tmp_path, monkeypatch):
    """``while_starting`` (describe, in the main job) runs while the server loads; if it fails,
    the server process is stopped, not left behind."""
    from mmalign.toy import curate

    started, popen = [], curate.subprocess.Popen
    monkeypatch.setattr(curate.subprocess, "Popen", lambda *a, **k: started.append(popen(*a, **k)) or started[-1])

    def describe() -> None:
        raise RuntimeError("describe failed")

    with pytest.raises(RuntimeError, match="describe failed"):
        with curate.served_fix_model(tmp_path / "server.log", while_starting=describe):
            pytest.fail("the server must not be yielded")
    assert len(started) == 1 and started[0].poll() is not None
