"""attach + transformers.Trainer trains as is; VeraCallback writes verakit adapters at checkpoints."""

import torch

from verakit import VeraConfig, attach, load_adapter, read_adapter, vera_layers


class _Rows(torch.utils.data.Dataset):
    def __init__(self, n=16, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randint(0, 99, (n, 10), generator=g)
        self.y = (self.x[:, 0] % 3).long()  # learnable from the first token

    def __len__(self):
        return len(self.x)

    def __getitem__(self, i):
        return {"input_ids": self.x[i], "labels": self.y[i]}


def test_trainer_with_vera_callback(tiny_bert_clf, tmp_path):
    from transformers import Trainer, TrainingArguments

    from verakit.integrations.trainer import VeraCallback

    torch.set_num_threads(1)
    base_sd = {k: v.clone() for k, v in tiny_bert_clf.state_dict().items()}
    model = attach(tiny_bert_clf, VeraConfig(r=8))
    args = TrainingArguments(
        output_dir=str(tmp_path / "run"), max_steps=4, save_steps=2, per_device_train_batch_size=4,
        learning_rate=5e-2, report_to=[], logging_strategy="no", use_cpu=True, save_only_model=True,
        disable_tqdm=True, seed=0,
    )
    cb = VeraCallback(extra={"task": "toy"})
    Trainer(model=model, args=args, train_dataset=_Rows(), callbacks=[cb]).train()

    run = tmp_path / "run"
    assert cb.written == [run / "checkpoint-2/adapter.safetensors", run / "checkpoint-4/adapter.safetensors",
                          run / "adapter.safetensors"]
    first, last = read_adapter(cb.written[0]), read_adapter(cb.written[2])
    assert first.extra == {"task": "toy", "global_step": 2, "labels": ["LABEL_0", "LABEL_1", "LABEL_2"]}
    name = "bert.encoder.layer.0.attention.self.query"
    # the Trainer moved the vectors (b starts at 0) and the files follow it
    assert last.b[name].abs().max() > 0 and not torch.equal(first.b[name], last.b[name])
    assert torch.equal(last.b[name], vera_layers(model)[name].vera_b.detach())
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(base_sd)
    load_adapter(fresh, cb.written[2])
    x = torch.randint(0, 99, (2, 10))
    model.eval()
    with torch.no_grad():
        assert torch.equal(fresh(input_ids=x).logits, model(input_ids=x).logits)


def test_only_the_main_process_writes(tiny_bert_clf, tmp_path):
    """Under DDP every rank runs the callback: only world process zero writes (every rank holds the same
    vectors, and two writers would race on one file); the main process writes the model a wrapper holds."""
    from transformers import TrainerControl, TrainerState, TrainingArguments

    from verakit.integrations.trainer import VeraCallback

    model = attach(tiny_bert_clf, VeraConfig(r=4))
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    cb = VeraCallback()
    other = TrainerState(global_step=3, is_world_process_zero=False)
    cb.on_save(args, other, TrainerControl(), model=model)
    cb.on_train_end(args, other, TrainerControl(), model=model)
    assert cb.written == [] and not any(tmp_path.rglob("*.safetensors"))
    main = TrainerState(global_step=3, is_world_process_zero=True)

    class Wrapper(torch.nn.Module):  # as DistributedDataParallel holds the model in .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    cb.on_save(args, main, TrainerControl(), model=Wrapper(model))
    assert cb.written == [tmp_path / "checkpoint-3" / "adapter.safetensors"]
    assert read_adapter(cb.written[0]).extra["global_step"] == 3
