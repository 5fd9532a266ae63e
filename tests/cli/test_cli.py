"""The `tether` command line, run in-process with typer's runner on the tiny model."""

import json

from typer.testing import CliRunner

from cli import demo
from cli.main import app

runner = CliRunner()


def test_models_list_names_the_builtins():
    result = runner.invoke(app, ["models", "list"])
    assert result.exit_code == 0, result.output
    assert "tiny-random" in result.output and "smollm2-135m-instruct" in result.output


def test_unknown_model_fails_with_a_way_to_get_it():
    result = runner.invoke(app, ["models", "prepare", "org/not-here"])
    assert result.exit_code == 1
    assert "never downloaded" in result.output


def test_data_validate_lists_every_problem(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        '{"messages": [{"role": "user", "content": "hi"}, '
        '{"role": "assistant", "content": "yo"}]}\n'
        "not json\n"
        '{"messages": [{"role": "robot", "content": "x"}]}\n'
        '{"prompt": "q"}\n'
    )
    result = runner.invoke(app, ["data", "validate", str(bad), "--model", "tiny-random"])
    assert result.exit_code == 1
    assert "line 2" in result.output and "[invalid_json]" in result.output
    assert "line 3" in result.output and "[unknown_role]" in result.output
    assert "line 4" in result.output
    assert "1 valid examples" in result.output


def test_train_writes_an_adapter_and_resumes_from_its_checkpoint(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(demo.SAMPLE.read_text())
    args = [
        "train", "--model", "tiny-random", "--data", str(data), "--preset", "paper",
        "--steps", "4", "--batch-size", "4", "--checkpoint-every", "2",
        "--checkpoint-dir", str(tmp_path / "ckpt"), "--out", str(tmp_path / "adapter"),
        "--json", str(tmp_path / "run.json"),
    ]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    summary = json.loads((tmp_path / "run.json").read_text())
    assert summary["steps"] == 4 and summary["resumed_from"] == 0
    assert all(step["beta_mean"] >= 0.1 for step in summary["history"])  # paper rule floor

    again = runner.invoke(app, args)  # the step-2 checkpoint is there: resume from it
    assert again.exit_code == 0, again.output
    assert json.loads((tmp_path / "run.json").read_text())["resumed_from"] == 2


def test_train_rejects_an_unknown_preset(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text(demo.SAMPLE.read_text())
    result = runner.invoke(
        app,
        ["train", "--model", "tiny-random", "--data", str(data), "--preset", "yolo",
         "--out", str(tmp_path / "a")],
    )  # fmt: skip
    assert result.exit_code == 1
    assert "choose one of" in result.output


def test_quick_demo_runs_the_service_path_end_to_end(tmp_path, capsys, monkeypatch):
    from core.dispatch import set_dispatcher

    home = tmp_path / "demo"
    # Everything the demo would default, set here so monkeypatch undoes it after the test.
    env = {
        "DATA_DIR": str(home), "MODEL_CACHE_DIR": str(home / "models"), "DATABASE_URL": "",
        "WORKER_MODE": "inprocess", "STORAGE_BACKEND": "local", "AUDIT_MAX_NEW_TOKENS": "8",
        "MAX_ASR": "1.0", "MAX_ASR_INCREASE": "1.0", "MAX_OVER_REFUSAL": "1.0",
    }  # fmt: skip
    for name, value in env.items():
        monkeypatch.setenv(f"TETHER_{name}", value)
    set_dispatcher(None)
    try:
        assert demo.main(["--quick", "--dir", str(home)]) == 0
    finally:
        set_dispatcher(None)
    out = capsys.readouterr().out
    assert "benign.jsonl: 40 examples" in out and "attack.jsonl: 52 examples" in out
    assert out.count("SUCCEEDED") + out.count("REJECTED") == 2
    assert "risk: 52 examples" in out and "audit: ASR" in out
    # The jobs fine-tune the aligned base the demo built first, as the full demo does.
    assert "saved tiny-random-safe" in out and (home / "models" / "tiny-random-safe").is_dir()
    released = list((tmp_path / "demo" / "objects" / "released").rglob("adapter_config.json"))
    assert released  # the benign job's adapter, at least, is released to the local store
