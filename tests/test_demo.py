"""The main job end to end on a small synthetic world (the README's first command, scaled down)."""
import json

import pandas as pd
import pytest

from hpasc.cli import main
from hpasc.metric import score
from hpasc.submission import validate_submission


@pytest.mark.slow
def test_demo_runs_end_to_end_and_beats_the_image_level_baselines(tmp_path, one_torch_thread):
    work = tmp_path / "demo"
    code = main(["demo", "--work", str(work), "--train", "24", "--test", "6", "--size", "256"])
    result = json.loads((work / "demo_result.json").read_text())
    # the contract: mAP, submission, truth, baselines {name: mAP}; runs left in DIR/runs
    assert {"mAP", "submission", "truth", "baselines"} <= set(result)
    assert set(result["baselines"]) == {"image_truth", "image_model"}
    assert sorted(p.name for p in (work / "runs" / "tiny").iterdir()) == ["fold0", "fold1"]
    for fold in ("fold0", "fold1"):
        run = work / "runs" / "tiny" / fold
        assert {"config.yaml", "best.pt", "last.pt", "log.csv", "oof.csv", "curves.png"} <= {
            p.name for p in run.iterdir()}
    # the submission is valid, covers the sample's IDs, and the reported mAP is its score
    sample = work / "data" / "sample_submission.csv"
    assert validate_submission(result["submission"], sample) == []
    sub = pd.read_csv(result["submission"])
    assert list(sub.ID) == list(pd.read_csv(sample).ID)
    assert score(result["truth"], result["submission"]).mAP == pytest.approx(result["mAP"])
    assert (work / "report" / "index.html").is_file()
    assert len(list((work / "masks" / "test" / "overlay").glob("*.png"))) == 6
    # it learned cells, not just images
    assert result["beats_baselines"] and code == 0
    assert result["mAP"] > max(result["baselines"].values())
