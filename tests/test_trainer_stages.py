"""Sequential stages: an earlier stage's adapter continued, its data replayed into the next."""
import json

import torch
from _trainer_helpers import DEMO_MODEL, adapter, demo_data, fast_args, run_cli

from trilora.trainer.config import TrainConfig
from trilora.trainer.run import build_model, prepare_records


def test_replay_mixes_the_earlier_stage_into_training(tmp_path):
    stage1 = demo_data(tmp_path, 200, "rotate.jsonl", "rotate")
    stage2 = demo_data(tmp_path, 100, "reverse.jsonl", "reverse")
    config = TrainConfig(model=str(DEMO_MODEL), data=[str(stage2)], replay_data=[str(stage1)], replay=0.2,
                         split=(0.8, 0.1, 0.1))
    splits = prepare_records(config)
    prompts = [r.data["prompt"] for r in splits.train]
    replayed = sum(p.startswith("rotate:") for p in prompts)
    assert len(prompts) - replayed == 80  # stage 2's own training split
    assert replayed == round(0.2 / 0.8 * 80)  # replay is 20 % of the stage
    # validation and test stay stage 2's own: the metric measures the new task
    assert all(r.data["prompt"].startswith("reverse:") for r in splits.validation + splits.test)
    assert prepare_records(config).train == splits.train  # deterministic


def test_init_adapter_continues_the_earlier_stage(tmp_path):
    stage1 = demo_data(tmp_path, 120, "rotate.jsonl", "rotate")
    stage2 = demo_data(tmp_path, 120, "reverse.jsonl", "reverse")
    code, _, err = run_cli(fast_args(tmp_path / "s1", stage1, steps=4))
    assert code == 0, err
    first = adapter(tmp_path / "s1" / "adapter")
    config = TrainConfig(model=str(DEMO_MODEL), data=[str(stage2)], init_adapter=str(tmp_path / "s1" / "adapter"),
                         kernel_backend="torch")
    model = build_model(config, DEMO_MODEL, torch.device("cpu"), torch.float32)
    params = dict(model.named_parameters())
    for key, value in first.items():
        name = key.removeprefix("base_model.model.").replace(".lora_A.", ".lora_A.default.").replace(
            ".lora_B.", ".lora_B.default.")
        assert params[name].requires_grad and torch.equal(params[name].detach(), value)
    code, _, err = run_cli(fast_args(tmp_path / "s2", stage2, steps=4, init_adapter=tmp_path / "s1" / "adapter",
                                     replay_data=stage1, replay=0.3))
    assert code == 0, err
    summary = json.loads((tmp_path / "s2" / "summary.json").read_text())
    assert summary["config"]["init_adapter"].endswith("adapter") and summary["config"]["replay"] == 0.3
    assert adapter(tmp_path / "s2" / "adapter").keys() == first.keys()


def test_stage_options_are_checked(tmp_path):
    data = demo_data(tmp_path, 50)
    for extra, message in ((dict(replay=0.3), "--replay needs --replay-data"),
                           (dict(replay=1.0, replay_data=data), "replay must be in"),
                           (dict(method="full", init_adapter=tmp_path), "method 'full' has none"),
                           (dict(init_adapter=tmp_path / "gone"), "adapter directory")):
        code, _, err = run_cli(fast_args(tmp_path / "out", data, **extra))
        assert code == 2 and message in err, err
        assert not (tmp_path / "out").exists()
