"""The main job end to end on a small synthetic world (the README's first command, scaled down)."""
import json

import pandas as pd
import pytest

from hpasc.cli import main
from hpasc.config import load_config
from hpasc.metric import score
from hpasc.submission import validate_submission


@pytest.mark.slow
def test_demo_runs_end_to_end_and_beats_the_image_level_baselines(tmp_path, one_torch_thread):
    work = tmp_path / "demo"
    # the tiny config's two rounds: 8 epochs on the image labels (given: kept), 4 from those weights
    code = main(["demo", "--work", str(work), "--train", "24", "--test", "6", "--size", "256", "--folds", "3",
                 "train.epochs=8"])
    result = json.loads((work / "demo_result.json").read_text())
    # the contract: mAP, submission, truth, baselines {name: mAP}; runs left in DIR/runs
    assert {"mAP", "submission", "truth", "baselines"} <= set(result)
    assert set(result["baselines"]) == {"image_truth", "image_model"}
    # three folds, then one pseudo-label round of them; the last round predicts the test images
    tiny = work / "runs" / "tiny"
    assert sorted(p.name for p in tiny.iterdir()) == ["fold0", "fold1", "fold2", "round1"]
    assert result["runs"] == [str(tiny / "round1" / f"fold{k}") for k in range(3)]
    for run in [tiny / f"fold{k}" for k in range(3)] + [tiny / "round1" / f"fold{k}" for k in range(3)]:
        assert {"config.yaml", "best.pt", "last.pt", "log.csv", "oof.csv", "curves.png"} <= {
            p.name for p in run.iterdir()}
    assert len(pd.read_csv(tiny / "round1" / "fold2" / "log.csv")) == 4
    assert load_config(tiny / "round1" / "fold2" / "config.yaml").model.pretrained == str(tiny / "fold2" / "best.pt")
    # the recipe's alpha chosen on the out-of-fold cells (the training images have cell truth)
    from hpasc.blend import DEFAULT_ALPHAS

    assert result["recipe"]["alpha"] in DEFAULT_ALPHAS and (work / "recipe.yaml").is_file()
    assert result["recipe"]["oof_mAP"] >= result["recipe"]["config_oof_mAP"]
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
    # cell-level evaluation beside the mAP: the ceiling of these masks and the cell AUCs
    assert 0 < result["oracle_mAP"] <= 1 and result["mAP"] <= result["oracle_mAP"]
    assert result["oracle_share"] == pytest.approx(result["mAP"] / result["oracle_mAP"])
    auc = result["cell_auc"]
    assert {"within", "mean", "per_class"} <= set(auc) and 0 < auc["mean"] <= 1
    assert set(auc["per_class"]) == {str(c) for c in range(19)}

    # the same pipeline on an existing competition-layout folder (here: the world just made), briefly
    quick = ["train.epochs=1", "train.max_steps_per_epoch=2"]
    other = tmp_path / "other"
    assert main(["demo", "--work", str(other), "--data", str(work / "data"), *quick]) in (0, 1)
    again = json.loads((other / "demo_result.json").read_text())
    assert again["truth"] == str(work / "data" / "truth" / "test.csv") and not (other / "data").exists()
    assert score(again["truth"], again["submission"]).mAP == pytest.approx(again["mAP"])


def test_budget_folds_spend_the_budget_on_more_folds_for_fewer_images():
    from hpasc.demo import budget_folds

    assert budget_folds(512, 16) == 2  # 16 x 512 x 1 = 8192: the budget exactly
    assert budget_folds(320, 16) == 2  # a third fold would cost 10240
    assert budget_folds(256, 16) == 3  # 16 x 256 x 2 = 8192
    assert budget_folds(160, 16) == 4  # 16 x 160 x 3 = 7680; a fifth fold would cost 10240
    assert budget_folds(128, 16) == 4  # a fifth fold would be paid for (8192), but 4 is the most
    assert budget_folds(24, 8) == 4 and budget_folds(5000, 16) == 2  # never more than 4, never fewer than 2
    assert budget_folds(160, 16, budget=4000) == 2
    with pytest.raises(ValueError, match="images and epochs"):
        budget_folds(0, 16)


def test_budget_epochs_train_every_model_as_long_as_the_demo_does():
    from hpasc.demo import budget_epochs

    assert budget_epochs(512, 2, 16) == 16  # 256 images x 16 epochs = 4096: the model budget exactly
    assert budget_epochs(5000, 2, 16) == 16  # more data: never fewer epochs than the config's
    assert budget_epochs(160, 4, 16) == 34  # 120 images a fold: 4096 / 120 = 34.1
    assert budget_epochs(256, 3, 16) == 24  # 170.7 images a fold: 24.0
    assert budget_epochs(160, 4, 16, model_budget=1200) == 16
    with pytest.raises(ValueError, match="2\\+ folds"):
        budget_epochs(160, 1, 16)


def test_the_demo_plans_epochs_unless_they_are_given(tmp_path, monkeypatch, capsys):
    # stop the demo right after planning (at segmentation) and read the config it saved
    import hpasc.segmentation as segmentation
    from hpasc.demo import run_demo
    from hpasc.synthetic import synthesize

    class Planned(Exception):
        pass

    def stop(*args, **kwargs):
        raise Planned

    monkeypatch.setattr(segmentation, "segment_folder", stop)
    data = tmp_path / "data"
    synthesize(data, n_train=24, n_test=2, size=128, seed=1, workers=1)
    # 4 folds of 24: 18 images a fold; the 12 + 4 epochs of tiny.yaml's two rounds stretched to
    # 4096 / 18 = 228 in all, alike: 12 x 228 / 16 = 171 and 4 x 228 / 16 = 57
    for i, (overrides, epochs) in enumerate((((), (171, 57)), (("train.epochs=3",), (3, 4)),
                                             (("pseudo.epochs=2",), (12, 2)))):
        work = tmp_path / f"w{i}"
        with pytest.raises(Planned):
            run_demo(work, data_dir=data, overrides=overrides, verbose=False)
        cfg = load_config(work / "demo_config.yaml")
        assert (cfg.train.epochs, cfg.pseudo.epochs) == epochs
    # planning comes after the folds' own check: one fold is a one-line error, not a traceback
    assert main(["demo", "--work", str(tmp_path / "one"), "--data", str(data), "--folds", "1"]) == 2
    err = capsys.readouterr().err
    assert "n_folds must be at least 2, got 1" in err and "Traceback" not in err


def test_demo_data_must_be_a_competition_layout(tmp_path, capsys):
    (tmp_path / "data" / "train").mkdir(parents=True)
    assert main(["demo", "--work", str(tmp_path / "w"), "--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing test, train.csv, sample_submission.csv" in err[0]
