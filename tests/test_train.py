"""sherry_export.train: tiny QAT runs with the Hugging Face Trainer on fixture text, checkpoints, DDP, errors."""

import hashlib
import json
import os
import shutil
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from sherry_export.cli import main
from sherry_export.models import tiny_llama
from sherry_export.qat import ArenasConfig, SherryConfig, TernaryConfig, arenas_schedule, load_qat_model, quantize_
from sherry_export.train import TrainConfig, check_checkpoint, end_distributed, run, train

FIXTURE = Path(__file__).parent / "fixtures" / "tiny_corpus.txt"


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models train fastest on one thread, and the CI machine's cores are shared."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def byte_streams() -> dict[str, np.ndarray]:
    """The fixture text as bytes: tiny_llama's 256-token vocabulary, no tokenizer needed."""
    ids = np.frombuffer(FIXTURE.read_bytes(), dtype=np.uint8)
    return {"train": ids[:1800], "heldout": ids[1800:]}


def tiny_config(output: Path, **overrides) -> TrainConfig:
    settings = dict(
        steps=12, batch=4, seq_len=32, lr=3e-3, lr_warmup_ratio=0.0, log_every=2, save_every=6,
        output=output, extra_args={"disable_tqdm": True},
    )  # fmt: skip
    settings.update(overrides)
    return TrainConfig(**settings)


def sherry_tiny(seed: int = 0, lambda_max: float = 0.5):
    model = tiny_llama(seed)
    quantize_(model, SherryConfig(group_size=32, arenas=ArenasConfig(lambda_max, warmup_ratio=0.25)))
    return model


def param_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, value in sorted(model.state_dict().items()):
        digest.update(name.encode() + value.detach().cpu().numpy().tobytes())
    return digest.hexdigest()


def losses(trainer) -> list[float]:
    return [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]


def test_training_lowers_the_loss_and_logs_lambda(tmp_path):
    model = sherry_tiny()
    trainer = train(tiny_config(tmp_path, steps=40, log_every=5, save_every=100), model, byte_streams())
    curve = losses(trainer)
    assert curve[-1] < curve[0] - 1.0, curve
    schedule = arenas_schedule(model)
    logged = {entry["step"]: entry["arenas_lambda"] for entry in trainer.state.log_history if "loss" in entry}
    assert logged == {step: schedule.at(step) for step in range(5, 41, 5)}
    assert logged[10] == 0.5 and logged[40] == 0.0  # peak after the 25 % warm-up, zero at the end
    assert all(entry["tokens_per_s"] > 0 for entry in trainer.state.log_history if "loss" in entry)


def test_lambda_counts_optimizer_steps_not_forwards(tmp_path):
    """With gradient accumulation every micro-batch of one optimizer step sees the same λ (AngelSlim's bug)."""
    model = sherry_tiny()
    seen = []
    probe = model.get_submodule("model.layers.0.self_attn.q_proj")
    probe.register_forward_pre_hook(lambda module, args: seen.append(module.arenas.value) if module.training else None)
    streams = {"train": byte_streams()["train"][: 12 * 4 * 32]}  # whole accumulation cycles per epoch
    train(tiny_config(tmp_path, steps=8, grad_accum=3, save_every=100), model, streams)
    schedule = arenas_schedule(model)
    assert seen == [schedule.at(step) for step in range(1, 9) for _ in range(3)]


def test_checkpoint_round_trip_is_bit_exact(tmp_path):
    model = sherry_tiny()
    trainer = train(tiny_config(tmp_path / "run", steps=6), model, byte_streams())
    trainer.save_model(str(tmp_path / "final"))
    loaded, config = load_qat_model(tmp_path / "final")
    assert config == SherryConfig(group_size=32, arenas=ArenasConfig(0.5, 0.25))
    assert param_digest(loaded) == param_digest(model)
    ids = torch.from_numpy(byte_streams()["heldout"][:32].astype(np.int64))[None]
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_resume_continues_exactly(tmp_path):
    """Stopping at a checkpoint and resuming gives the same weights and λ as training straight through."""
    straight = sherry_tiny()
    reference = train(tiny_config(tmp_path / "a", steps=8, save_every=4), straight, byte_streams())
    resumed_dir = tmp_path / "b"
    shutil.copytree(tmp_path / "a" / "checkpoint-4", resumed_dir / "checkpoint-4")
    resumed = sherry_tiny(seed=1)  # different initial weights: everything must come from the checkpoint
    config = tiny_config(resumed_dir, steps=8, save_every=4)
    trainer = train(config, resumed, byte_streams(), resumed_dir / "checkpoint-4")
    assert param_digest(resumed) == param_digest(straight)
    tail = [entry for entry in reference.state.log_history if "loss" in entry and entry["step"] > 4]
    again = [entry for entry in trainer.state.log_history if "loss" in entry and entry["step"] > 4]
    assert [e["arenas_lambda"] for e in again] == [e["arenas_lambda"] for e in tail]
    assert [e["loss"] for e in again] == pytest.approx([e["loss"] for e in tail], rel=1e-6)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    """One saved checkpoint (Sherry, gs 32, tiny_llama) for the corruption tests."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    output = tmp_path_factory.mktemp("ckpt")
    train(tiny_config(output, steps=2, save_every=2), sherry_tiny(), byte_streams())
    torch.set_num_threads(threads)
    return output / "checkpoint-2"


def damaged(checkpoint: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "checkpoint-2"
    shutil.copytree(checkpoint, copy)
    return copy


def test_valid_checkpoint_passes(checkpoint):
    check_checkpoint(checkpoint, sherry_tiny())


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (lambda: tiny_llama(hidden_size=32), "hidden_size=64"),
        (lambda: tiny_llama(num_hidden_layers=3), "num_hidden_layers=2"),
        (tiny_llama, "sherry_qat"),  # trained with Sherry, resumed without quantization
        (lambda: quantize_(m := tiny_llama(), TernaryConfig()) or m, "sherry_qat"),
    ],
)
def test_mismatched_checkpoint(checkpoint, model, message):
    with pytest.raises(ValueError, match=message):
        check_checkpoint(checkpoint, model())


def test_truncated_weights(checkpoint, tmp_path):
    bad = damaged(checkpoint, tmp_path)
    weights = bad / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ValueError, match="unreadable"):
        check_checkpoint(bad, sherry_tiny())
    weights.write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="unreadable"):
        check_checkpoint(bad, sherry_tiny())


def test_missing_and_misshapen_tensors(checkpoint, tmp_path):
    bad = damaged(checkpoint, tmp_path)
    tensors = load_file(bad / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    tensors["model.norm.weight"] = torch.ones(3)
    tensors["extra.weight"] = torch.ones(1)
    save_file(tensors, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing: model\.layers\.1\.mlp\.up_proj\.weight; unexpected: extra") as err:
        check_checkpoint(bad, sherry_tiny())
    assert "wrong shape: model.norm.weight" in str(err.value)


def test_damaged_optimizer_and_state(checkpoint, tmp_path):
    bad = damaged(checkpoint, tmp_path)
    optimizer = bad / "optimizer.pt"
    optimizer.write_bytes(optimizer.read_bytes()[: optimizer.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"optimizer state .* unreadable"):
        check_checkpoint(bad, sherry_tiny())
    (bad / "trainer_state.json").write_text("{")
    with pytest.raises(ValueError, match="trainer_state"):
        check_checkpoint(bad, sherry_tiny())
    with pytest.raises(FileNotFoundError):
        check_checkpoint(tmp_path / "nowhere", sherry_tiny())


def test_resume_errors(checkpoint, tmp_path):
    run_dir = checkpoint.parent
    with pytest.raises(ValueError, match="already holds checkpoints"):
        run(tiny_config(run_dir, data=str(FIXTURE)))
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        run(tiny_config(tmp_path / "empty", resume="last", data=str(FIXTURE)))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (dict(lr=-1e-3), "learning rate"),
        (dict(lr=float("inf")), "learning rate"),
        (dict(quant="int4"), "unknown --quant"),
        (dict(steps=0), "steps must be a positive integer"),
        (dict(warmup_ratio=1.5, arenas=True), "warmup_ratio"),
        (dict(steps=3, warmup_ratio=0.9, arenas=True), "no decay"),
        (dict(lambda_max=-1.0, arenas=True), "lambda_max"),
        (dict(quant="none", arenas=True), "needs a quantized model"),
        (dict(quant="ternary", group_size="channel"), "not per channel"),
        (dict(quant="sherry", group_size="tensor"), "not per tensor"),
        (dict(hidden=100, heads=3), "heads of even size"),
        (dict(heads=4, kv_heads=3), "multiple of kv_heads"),
        (dict(lr_schedule="step"), "unknown --lr-schedule"),
        (dict(lr_warmup_ratio=1.0), "lr warm-up"),
        (dict(eval_every=-1), "eval_every"),
        (dict(diagnostics=True, eval_every=0), "--eval-every"),
    ],
)
def test_bad_hyperparameters(overrides, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        run(tiny_config(tmp_path, **overrides))


def test_cli_reports_bad_hyperparameters(tmp_path, capsys):
    assert main(["train", "--lr", "-0.1", "--output", str(tmp_path)]) == 2
    assert "learning rate must be a positive" in capsys.readouterr().err
    assert main(["train", "--arenas", "--steps", "4", "--warmup-ratio", "0.9", "--output", str(tmp_path)]) == 2
    assert "no decay" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--quant", "int4"])
    assert "invalid choice" in capsys.readouterr().err


def test_cli_trains_from_scratch_on_a_text_file(tmp_path, capsys):
    """`sherry train` end to end: BPE on the file, scratch model, Sherry + Arenas, checkpoint, final save."""
    output = tmp_path / "run"
    argv = [
        "train", "--data", str(FIXTURE), "--cache", str(tmp_path / "cache"), "--output", str(output),
        "--hidden", "64", "--layers", "1", "--heads", "2", "--vocab", "300", "--group-size", "32",
        "--steps", "4", "--batch", "2", "--seq-len", "32", "--save-every", "2", "--log-every", "2",
        "--eval-every", "4", "--eval-batches", "1", "--threads", "1", "--diagnostics", "--arenas",
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "saved" in out and "diagnostics step 4" in out
    history = json.loads((output / "log_history.json").read_text())
    assert [entry["step"] for entry in history if "grad_erank" in entry] == [0, 4]
    config = json.loads((output / "config.json").read_text())
    assert config["sherry_qat"]["method"] == "sherry" and config["vocab_size"] <= 300
    assert (output / "tokenizer.json").is_file() and (output / "checkpoint-4").is_dir()
    state = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())
    assert any("eval_loss" in entry for entry in state["log_history"])
    assert main([*argv, "--resume", "--steps", "6"]) == 0  # continue the same run for two more steps
    assert (output / "checkpoint-6").is_dir()


def _ddp_worker(rank: int, port: int, folder: str) -> None:
    """One rank of a 2-process gloo job, set up as torchrun would (environment variables)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2", LOCAL_WORLD_SIZE="2")  # fmt: skip
    torch.set_num_threads(1)
    model = sherry_tiny()
    trainer = train(tiny_config(Path(folder) / "out", steps=4, save_every=100), model, byte_streams())
    record = {
        "world_size": trainer.args.world_size,
        "digest": param_digest(model),
        "losses": losses(trainer),
        "lambda": arenas_schedule(model).value,
    }
    Path(folder, f"rank{rank}.json").write_text(json.dumps(record))
    end_distributed()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_gloo_processes_agree(tmp_path):
    mp.spawn(_ddp_worker, args=(free_port(), str(tmp_path)), nprocs=2, join=True)
    ranks = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert ranks[0]["world_size"] == ranks[1]["world_size"] == 2
    assert ranks[0]["digest"] == ranks[1]["digest"]  # all-reduced gradients keep the replicas identical
    assert ranks[0]["lambda"] == ranks[1]["lambda"]
    single = sherry_tiny()
    train(tiny_config(tmp_path / "single", steps=4, save_every=100), single, byte_streams())
    assert param_digest(single) != ranks[0]["digest"]  # the two ranks really saw different batches


def test_pretrained_source_without_tokenizer(tmp_path):
    tiny_llama().save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match="no tokenizer"):
        run(tiny_config(tmp_path / "out", init=str(tmp_path / "bare"), data=str(FIXTURE), cache=tmp_path))
