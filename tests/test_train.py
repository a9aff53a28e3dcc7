"""The fit loop on tiny linear models: selection, stopping, accumulation, skipping, resuming."""

import pickle

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from mini_kd import MiniKDError
from mini_kd.runtime import pick_device, seed_everything
from mini_kd.train import FitConfig, fit, freeze, load_checkpoint


def regression_data(n=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, generator=generator)
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]]) + 0.1 * torch.randn(n, 1, generator=generator)
    return x, y


def mse_step(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def scripted(losses, **others):
    """A whole-set val_step reporting ``losses[epoch - 1]`` (and ``others[key][epoch - 1]``)."""
    epochs = iter(range(len(losses)))

    def val_step(model):
        epoch = next(epochs)
        return {"loss": losses[epoch], **{key: values[epoch] for key, values in others.items()}}

    return val_step


def weights(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_pick_device_defaults_to_cpu_without_gpu_and_refuses_a_missing_one():
    assert pick_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert pick_device() == torch.device("cpu")
        with pytest.raises(MiniKDError, match="no CUDA"):
            pick_device("cuda")


def test_same_seed_gives_the_same_weights_and_another_seed_does_not():
    x, y = regression_data()

    def run(seed):
        seed_everything(seed)
        model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))
        loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True)
        fit(model, mse_step, loader, FitConfig(epochs=2, monitor="train_loss", seed=seed))
        return weights(model)

    assert torch.equal(run(0), run(0))
    assert not torch.equal(run(0), run(1))


@pytest.mark.parametrize("accumulate", [4, 3])  # 3: the epoch ends inside a window of 1
def test_gradient_accumulation_equals_one_big_batch(accumulate):
    x, y = regression_data(n=4)
    small, big = nn.Linear(3, 1), nn.Linear(3, 1)
    big.load_state_dict(small.state_dict())
    sgd = lambda model: torch.optim.SGD(model.parameters(), lr=0.1)  # noqa: E731

    fit(small, mse_step, DataLoader(TensorDataset(x, y), batch_size=1),
        FitConfig(epochs=1, accumulate=accumulate, monitor="train_loss"), optimizer=sgd)
    batches = [(x[i:i + accumulate], y[i:i + accumulate]) for i in range(0, 4, accumulate)]
    fit(big, mse_step, batches, FitConfig(epochs=1, monitor="train_loss"), optimizer=sgd)

    assert torch.allclose(weights(small), weights(big), atol=1e-6)


def test_early_stopping_stops_patience_epochs_after_the_best():
    history = fit(nn.Linear(3, 1), mse_step, [regression_data()],
                  FitConfig(epochs=10, patience=2), val_step=scripted([5, 4, 3, 3.5, 3.6, 1, 1, 1, 1, 1]))
    assert history.best_epoch == 3 and history.best_score == 3
    assert [row["epoch"] for row in history.rows] == [1, 2, 3, 4, 5]
    assert history.stopped_early


def test_min_epochs_keeps_early_epochs_out_of_selection_and_patience():
    history = fit(nn.Linear(3, 1), mse_step, [regression_data()],
                  FitConfig(epochs=6, patience=2, min_epochs=3), val_step=scripted([1, 2, 5, 4, 6, 7]))
    assert history.best_epoch == 4       # epochs 1-2 score better but come before min_epochs
    assert len(history.rows) == 6 and history.stopped_early


def test_accept_gates_which_epochs_can_be_best():
    history = fit(nn.Linear(3, 1), mse_step, [regression_data()], FitConfig(epochs=4),
                  val_step=scripted([4, 1, 3, 2], keep_rate=[0.5, 0.1, 0.6, 0.9]),
                  accept=lambda metrics: 0.3 <= metrics["val_keep_rate"] <= 1.0)
    assert history.column("val_loss") == [4, 1, 3, 2]
    assert history.best_epoch == 4       # epoch 2 has the lowest loss but keeps 10 % of patches


def test_on_epoch_end_runs_after_training_and_before_validation():
    events = []
    fit(nn.Linear(3, 1), lambda model, batch: events.append("train") or mse_step(model, batch),
        [regression_data()], FitConfig(epochs=2),
        val_step=lambda model: events.append("validate") or {"loss": 1.0},
        on_epoch_end=lambda model, epoch: events.append(f"end {epoch}"))
    assert events == ["train", "end 1", "validate", "train", "end 2", "validate"]


def test_the_best_weights_are_restored_at_the_end():
    seen = []

    def val_step(model):
        seen.append(weights(model).clone())
        return {"loss": [3, 1, 2, 4][len(seen) - 1]}

    model = nn.Linear(3, 1)
    history = fit(model, mse_step, [regression_data()], FitConfig(epochs=4, lr=0.1), val_step=val_step)
    assert history.best_epoch == 2
    assert torch.equal(weights(model), seen[1]) and not torch.equal(weights(model), seen[3])
    assert torch.equal(torch.cat([v.flatten() for v in history.best_state.values()]), seen[1])


def test_a_nan_loss_raises_and_says_where_and_what_to_do():
    def exploding(model, batch):
        return mse_step(model, batch) * float("nan")

    with pytest.raises(MiniKDError, match=r"epoch 1, batch 1.*lower the learning rate"):
        fit(nn.Linear(3, 1), exploding, [regression_data()], FitConfig(epochs=1, monitor="train_loss"))


def test_a_step_returning_none_skips_its_batch():
    x, y = regression_data(n=8)
    batches = [(x[i:i + 1], y[i:i + 1]) for i in range(8)]

    def skip_odd(model, batch):
        x, y = batch
        return None if x[0, 0] in x_odd else mse_step(model, batch)

    x_odd = x[1::2, 0]
    model, reference = nn.Linear(3, 1), nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    config = FitConfig(epochs=1, monitor="train_loss")
    history = fit(model, skip_odd, batches, config)
    fit(reference, mse_step, batches[0::2], config)

    assert history.rows[0]["skipped"] == 4
    assert torch.equal(weights(model), weights(reference))


def test_two_networks_with_two_optimisers_update_in_order_each_batch():
    model = nn.ModuleDict({"screen": nn.Linear(3, 1), "classify": nn.Linear(3, 1)})
    order = []

    def screen_step(model, batch):
        order.append("screen")
        return mse_step(model["screen"], batch)

    def classify_step(model, batch):
        order.append("classify")
        x, y = batch
        with torch.no_grad():  # the step sees the screen that was just updated
            weight = torch.sigmoid(model["screen"](x))
        return (F.mse_loss(model["classify"](x) * weight, y), {"weight": weight.mean()})

    screen_before = weights(model["screen"]).clone()
    history = fit(model, {"screen": screen_step, "classify": classify_step}, [regression_data()] * 2,
                  FitConfig(epochs=1, monitor="train_loss"),
                  optimizer={"screen": torch.optim.Adam(model["screen"].parameters(), lr=1e-2),
                             "classify": torch.optim.Adam(model["classify"].parameters(), lr=1e-3)})
    assert order == ["screen", "classify"] * 2
    row = history.rows[0]
    assert {"train_screen_loss", "train_classify_loss", "train_classify_weight"} <= row.keys()
    assert row["train_loss"] == pytest.approx(row["train_screen_loss"] + row["train_classify_loss"])
    assert not torch.equal(weights(model["screen"]), screen_before)


def test_step_and_optimiser_names_must_match():
    model = nn.ModuleDict({"a": nn.Linear(3, 1)})
    with pytest.raises(MiniKDError, match="same keys"):
        fit(model, {"a": mse_step}, [regression_data()], FitConfig(epochs=1, monitor="train_loss"),
            optimizer={"b": torch.optim.Adam(model.parameters())})


def test_monitoring_validation_without_a_val_step_is_refused():
    with pytest.raises(MiniKDError, match="no val_step"):
        fit(nn.Linear(3, 1), mse_step, [regression_data()], FitConfig(epochs=1))


def test_a_frozen_teacher_stays_in_eval_mode_and_unchanged():
    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.teacher = freeze(nn.Sequential(nn.Linear(3, 1), nn.Dropout(0.5)))
            self.student = nn.Linear(3, 1)

    def distil(model, batch):
        x, _ = batch
        assert not model.teacher.training and model.student.training
        return F.mse_loss(model.student(x), model.teacher(x))

    model = Student()
    teacher_before = weights(model.teacher).clone()
    fit(model, distil, [regression_data()], FitConfig(epochs=2, monitor="train_loss"))
    assert torch.equal(weights(model.teacher), teacher_before)
    assert not any(p.requires_grad for p in model.teacher.parameters())


def test_a_frozen_teacher_stays_frozen_through_pickling():  # how a worker process returns it
    teacher = pickle.loads(pickle.dumps(freeze(nn.Sequential(nn.Linear(3, 1), nn.Dropout(0.5)))))
    assert teacher.train() is teacher and not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


def test_resume_after_an_interruption_gives_the_same_weights(tmp_path):
    x, y = regression_data(n=12)

    def setup():
        seed_everything(0)
        model = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))
        loader = DataLoader(TensorDataset(x, y), batch_size=4, shuffle=True,
                            generator=torch.Generator().manual_seed(0))
        return model, loader

    def val_step(model, batch):
        return {"loss": mse_step(model, batch)}

    straight, loader = setup()
    expected = fit(straight, mse_step, loader, FitConfig(epochs=4, lr=0.05, accumulate=2),
                   val_step=val_step, val_data=[(x, y)])

    calls = 0

    def interrupted_step(model, batch):
        nonlocal calls
        calls += 1
        if calls > 2 * len(loader):  # the machine goes down during epoch 3
            raise KeyboardInterrupt
        return mse_step(model, batch)

    model, loader = setup()
    run = FitConfig(epochs=4, lr=0.05, accumulate=2, checkpoint_dir=tmp_path)
    with pytest.raises(KeyboardInterrupt):
        fit(model, interrupted_step, loader, run, val_step=val_step, val_data=[(x, y)])
    assert load_checkpoint(tmp_path / "last.pt", model)["history"]["rows"][-1]["epoch"] == 2

    model, loader = setup()
    resumed = fit(model, mse_step, loader, run, val_step=val_step, val_data=[(x, y)])

    assert torch.equal(weights(model), weights(straight))
    assert resumed.column("val_loss") == expected.column("val_loss")
    assert resumed.best_epoch == expected.best_epoch
    assert len(resumed.rows) == 4
    best = nn.Sequential(nn.Linear(3, 8), nn.Dropout(0.3), nn.Linear(8, 1))
    assert load_checkpoint(tmp_path / "best.pt", best)["epoch"] == expected.best_epoch
    assert torch.equal(weights(best), weights(straight))


def test_load_checkpoint_explains_a_missing_file_and_a_wrong_model(tmp_path):
    with pytest.raises(MiniKDError, match="no mini_kd checkpoint"):
        load_checkpoint(tmp_path / "best.pt", nn.Linear(3, 1))
    fit(nn.Linear(3, 1), mse_step, [regression_data()],
        FitConfig(epochs=1, monitor="train_loss", checkpoint_dir=tmp_path))
    with pytest.raises(MiniKDError, match="does not fit this model"):
        load_checkpoint(tmp_path / "best.pt", nn.Linear(4, 1))


def test_history_to_dict_is_plain_and_has_the_totals():
    history = fit(nn.Linear(3, 1), mse_step, [regression_data()], FitConfig(epochs=2, monitor="train_loss"))
    summary = history.to_dict()
    assert "best_state" not in summary
    assert summary["best_epoch"] == history.best_epoch and len(summary["rows"]) == 2
    assert summary["seconds"] == pytest.approx(sum(row["seconds"] for row in history.rows))


def test_fit_again_on_a_finished_checkpoint_trains_nothing(tmp_path):
    config = FitConfig(epochs=3, patience=1, checkpoint_dir=tmp_path)
    model = nn.Linear(3, 1)
    first = fit(model, mse_step, [regression_data()], config, val_step=scripted([2, 1, 3]))
    assert first.stopped_early and first.best_epoch == 2

    def must_not_run(model, batch):
        raise AssertionError("a finished run was trained again")

    again = fit(nn.Linear(3, 1), must_not_run, [regression_data()], config, val_step=scripted([]))
    assert again.to_dict()["rows"] == first.to_dict()["rows"] and again.best_epoch == 2


@pytest.mark.parametrize("content, what", [
    (b"hello", "text"),
    (b"PK\x03\x04truncated", "a cut-off zip"),
    (b"\x80\x02}q\x00.", "a plain pickle"),
])
def test_read_checkpoint_turns_an_unreadable_file_into_one_clear_error(tmp_path, content, what):
    from mini_kd.train import read_checkpoint

    path = tmp_path / "damaged.pt"
    path.write_bytes(content)
    with pytest.raises(MiniKDError, match="not a readable demo checkpoint.*; do this"):
        read_checkpoint(path, "demo", "do this")


def test_read_checkpoint_refuses_a_missing_file_and_one_without_a_dict(tmp_path):
    from mini_kd.train import read_checkpoint

    with pytest.raises(MiniKDError, match="no demo checkpoint at"):
        read_checkpoint(tmp_path / "missing.pt", "demo", "train one")
    torch.save([1, 2], tmp_path / "list.pt")
    with pytest.raises(MiniKDError, match="holds a list, not a demo checkpoint"):
        read_checkpoint(tmp_path / "list.pt", "demo", "train one")
    torch.save({"model": {}}, tmp_path / "dict.pt")
    assert read_checkpoint(tmp_path / "dict.pt", "demo", "train one") == {"model": {}}


@pytest.mark.parametrize("method", ["reskd", "lrmil", "ahdmil"])
def test_predict_on_a_damaged_checkpoint_prints_one_line_and_exits_2(tmp_path, capsys, method):
    from mini_kd.cli import main

    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes(b"PK\x03\x04truncated download")
    assert main(["predict", method, str(damaged), str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("mini-kd: error: ") and len(err.strip().splitlines()) == 1
    assert "not a readable" in err


def test_write_checkpoint_creates_the_folder_and_leaves_no_temporary_file(tmp_path):
    from mini_kd.train import read_checkpoint, write_checkpoint

    path = write_checkpoint({"model": {"w": torch.ones(2)}}, tmp_path / "new" / "folder" / "ck.pt")
    assert path == tmp_path / "new" / "folder" / "ck.pt"
    assert [p.name for p in path.parent.iterdir()] == ["ck.pt"]
    assert torch.equal(read_checkpoint(path, "demo", "-")["model"]["w"], torch.ones(2))
