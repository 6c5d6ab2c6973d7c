"""The adapters bench/peers.py drives the peers' trainers with, on the tiny target (the peers themselves run only
in their own environments, outside this suite): our rows in speculators' input format, with the layer numbering,
the pre-norm last state and the split it reads, and a checkpoint in the layout speculators writes read back as
the drafter vLLM would serve."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from bench.peer_trainers import modelopt_io as modelopt
from bench.peer_trainers import speculators_io as speculators
from models import eagle3_export
from models.feature_drafter import FeatureDrafterSpec, build_feature_drafter
from train.core.rows import Row


def rows(count: int, start: int = 0) -> list[Row]:
    made = []
    for i in range(start, start + count):
        ids = [5 + (7 * i + 3 * t) % 200 for t in range(9 + i % 5)]
        mask = [0] * 4 + [1] * (len(ids) - 4)
        made.append(Row(id=f"r{i}", input_ids=ids, loss_mask=mask, prompt_ids=ids[:4]))
    return made


@pytest.mark.parametrize("every_position", [False, True])
def test_our_rows_become_the_inputs_speculators_reads(tiny_target, tmp_path, every_position):
    from datasets import load_from_disk

    model = tiny_target.model
    train, heldout = rows(5), rows(2, start=5)
    d2t = torch.tensor([0, 3, 9, 17, 40, 41])
    inputs = speculators.write_inputs(model, train, heldout, (1, 0), d2t, 12, tmp_path, every_position)
    assert inputs["layer_ids"] == [1, 2]  # our layer outputs 0 and 1 = the streams entering layers 1 and 2
    data = load_from_disk(inputs["data"])
    assert json.loads((tmp_path / "data" / "state.json").read_text())["_format_type"] == "torch"
    assert len(data) == 7 and int(len(data) * inputs["train_data_ratio"]) == 5  # its split lands on ours
    for index, row in enumerate(train + heldout):
        stored = data[index]
        assert stored["input_ids"].tolist() == row.input_ids[:12] and stored["seq_len"] == len(row.input_ids[:12])
        expected_mask = [0] + [1] * (len(row.input_ids[:12]) - 1) if every_position else row.loss_mask[:12]
        assert stored["loss_mask"].tolist() == expected_mask
    assert inputs["scored_per_epoch"] == sum(int(data[i]["loss_mask"][1:].sum()) for i in range(5))
    ids = data[6]["input_ids"]
    states = load_file(str(tmp_path / "data" / "hidden_states" / "hs_6.safetensors"))
    assert torch.equal(states["token_ids"], ids)
    hidden = states["hidden_states"].float()
    assert hidden.shape == (len(ids), 3, model.config.hidden_size) and states["hidden_states"].dtype == torch.float16
    with torch.no_grad():
        reference = model(ids[None], output_hidden_states=True)
    layers = model.config.num_hidden_layers
    assert inputs["layer_ids"][0] < layers  # HF hidden_states[k] enters layer k (for k < n; n is normed)
    torch.testing.assert_close(hidden[:, 0], reference.hidden_states[inputs["layer_ids"][0]][0], atol=2e-3, rtol=2e-3)
    last = hidden[:, -1]  # before the final norm: the target's norm turns it into the last hidden state
    assert inputs["layer_ids"][1] == layers and torch.equal(hidden[:, 1], last)  # id n: the last layer's output
    assert not torch.allclose(last, reference.hidden_states[-1][0], atol=1e-2)
    torch.testing.assert_close(model.get_decoder().norm(last), reference.hidden_states[-1][0], atol=5e-3, rtol=5e-3)
    offsets, t2d = np.load(inputs["d2t"]), np.load(inputs["t2d"])
    assert (offsets + np.arange(len(d2t)) == d2t.numpy()).all()
    assert t2d.dtype == bool and t2d.sum() == len(d2t) and t2d[d2t.numpy()].all()


def test_a_validation_split_is_required(tiny_target, tmp_path):
    with pytest.raises(ValueError, match="validation split"):
        speculators.write_inputs(tiny_target.model, rows(3), [], (0,), torch.arange(4), 12, tmp_path)


def test_a_checkpoint_in_speculators_layout_reads_back_as_vllm_serves_it(tiny_target, tmp_path):
    """The layout speculators 0.9.0 saves (seen on this machine): its three Eagle-3.1 norms on, bf16 weights with a
    copy of the target's embedding, target_hidden_size null, `layer_types` sliding attention, a numbered epoch
    folder. Read back, it is the drafter an engine builds from those files."""
    model = tiny_target.model
    spec = FeatureDrafterSpec(feature_layers=(0, 1), draft_vocab_size=96, layout="eagle3", norm_before_fc=True,
                              norm_before_residual=True, norm_output=True, seed=2)
    drafter = build_feature_drafter(spec, model, [list(range(5, 200))])
    with torch.no_grad():
        for parameter in drafter.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.05)
    save = tmp_path / "checkpoints"
    out = eagle3_export.write(drafter.eval(), model.config, save / "0", "speculators", 3, "T", {})
    config = json.loads((out / "config.json").read_text())
    config.pop("draftsmith")
    config["target_hidden_size"] = None
    config["transformer_layer_config"] |= {"layer_types": ["sliding_attention"], "sliding_window": 2048}
    (out / "config.json").write_text(json.dumps(config))
    weights = {k: v.to(torch.bfloat16) if v.is_floating_point() else v
               for k, v in load_file(str(out / "model.safetensors")).items()}
    weights["embed_tokens.weight"] = model.get_input_embeddings().weight.detach().to(torch.bfloat16)
    save_file(weights, str(out / "model.safetensors"))
    (save / "1").mkdir()  # a folder without a checkpoint in it is not one
    assert speculators.epoch_checkpoints(save) == [out]
    read = eagle3_export.read_folder(out, model)
    assert read.spec.norm_before_fc and read.spec.norm_before_residual and read.spec.norm_output
    assert read.spec.own_embedding and read.spec.feature_layers == (0, 1)
    assert eagle3_export.check_export(out, read, model.config.hidden_size) < 1e-4  # the engine's reading agrees
    torch.testing.assert_close(read.reduce.weight, drafter.reduce.weight.to(torch.bfloat16).float())


@pytest.mark.parametrize("every_position", [False, True])
def test_our_rows_become_the_offline_files_modelopt_reads(tiny_target, tmp_path, every_position):
    """ModelOpt's offline layout (compute_hidden_states_hf.py): the aux decoder layers' outputs concatenated (its
    ids are output ids: our feature layers themselves), the normed last hidden state, a loss mask only where our
    loss scores some positions; its d2t as offsets."""
    model = tiny_target.model
    train, heldout = rows(5), rows(2, start=5)
    d2t = torch.tensor([0, 3, 9, 17, 40, 41])
    inputs = modelopt.write_inputs(model, tmp_path / "target", train, heldout, (1, 0), d2t, 12, tmp_path,
                                   every_position)
    assert inputs["layer_ids"] == [0, 1] and inputs["answer_only_loss"] is not every_position
    assert inputs["training_seq_len"] == max(len(r.input_ids[:12]) for r in train)
    files = sorted((tmp_path / "train").glob("*.pt"))
    assert len(files) == 5 and len(list((tmp_path / "heldout").glob("*.pt"))) == 2
    record = torch.load(files[3], weights_only=True)
    ids = torch.tensor(train[3].input_ids[:12])
    assert torch.equal(record["input_ids"], ids)
    with torch.no_grad():
        reference = model(ids[None], output_hidden_states=True)
    d = model.config.hidden_size
    assert record["aux_hidden_states"].shape == (len(ids), 2 * d) and record["aux_hidden_states"].dtype == torch.float32
    last_layer = model.config.num_hidden_layers - 1
    for slot, layer in enumerate(inputs["layer_ids"]):  # HF hidden_states[layer + 1] is decoder layer `layer`'s output
        aux = record["aux_hidden_states"][:, slot * d:(slot + 1) * d]
        if layer < last_layer:
            torch.testing.assert_close(aux, reference.hidden_states[layer + 1][0], atol=2e-3, rtol=2e-3)
        else:  # HF's last entry is after the final norm; the layer's own output is before it
            torch.testing.assert_close(model.get_decoder().norm(aux), reference.hidden_states[-1][0], atol=5e-3,
                                       rtol=5e-3)
    assert last_layer in inputs["layer_ids"]  # both cases are checked
    torch.testing.assert_close(record["hidden_states"], reference.hidden_states[-1][0], atol=5e-3, rtol=5e-3)
    assert torch.equal(record["hidden_states"], record["hidden_states"].half().float())  # fp16 numbers, as our cache
    if every_position:
        assert "loss_mask" not in record  # ModelOpt then scores every position with an all-ones mask
        assert inputs["scored_per_epoch"] == sum(len(r.input_ids[:12]) - 1 for r in train)
    else:
        assert record["loss_mask"].tolist() == train[3].loss_mask[:12]
        assert inputs["scored_per_epoch"] == sum(sum(r.loss_mask[1:12]) for r in train)
    offsets = torch.load(inputs["d2t"], weights_only=True)
    assert offsets.dtype == torch.int64 and torch.equal(offsets + torch.arange(len(d2t)), d2t)
    with pytest.raises(ValueError, match="at least 3"):
        modelopt.write_inputs(model, tmp_path, [Row(id="short", input_ids=[5, 6], loss_mask=[0, 1], prompt_ids=[5])],
                              [], (0,), d2t, 12, tmp_path / "short")


def test_modelopt_command_sets_the_budget_and_our_drafter_shape_as_recipe_overrides(tmp_path):
    (tmp_path / "inputs.json").write_text(json.dumps(
        {"layer_ids": [2, 15, 27], "draft_vocab_size": 8192, "training_seq_len": 256, "answer_only_loss": False}))
    argv = modelopt.command(tmp_path / "python", tmp_path / "inputs.json", tmp_path / "save", 3, 1e-3, 4, 5,
                            {"intermediate_size": 1536, "num_attention_heads": 9})
    assert argv[:4] == [str(tmp_path / "python"), str(modelopt.WRAPPER), str(tmp_path / "inputs.json"),
                        str(tmp_path / "save")]
    for override in ("training.num_train_epochs=3", "training.per_device_train_batch_size=4",
                     "training.learning_rate=0.001", "training.warmup_steps=5", "training.training_seq_len=256",
                     "training.answer_only_loss=false", 'training.save_strategy="no"', "training.use_cpu=true",
                     "training.bf16=false", "eagle.eagle_use_torch_compile=false",
                     "eagle.eagle_architecture_config.eagle_aux_hidden_state_layer_ids=[2,15,27]",
                     "eagle.eagle_architecture_config.intermediate_size=1536"):
        assert override in argv
    assert all(" " not in a for a in argv[4:])  # one dotlist entry each


def test_a_modelopt_export_is_refused_as_written_and_read_as_trained(tiny_target, tmp_path):
    """ModelOpt's export names its aux layers by output and carries a YaRN rope its training did not use: our
    reader refuses the rope (it cannot decode what an engine would serve) and `as_trained` describes what was
    trained (ids + 1, default rope) with the same weights."""
    model = tiny_target.model
    spec = FeatureDrafterSpec(feature_layers=(0, 1), draft_vocab_size=96, layout="eagle3", seed=3)
    drafter = build_feature_drafter(spec, model, [list(range(5, 200))])
    export = eagle3_export.write(drafter.eval(), model.config, tmp_path / "1", "eagle3", 3, "T", {})
    config = json.loads((export / "config.json").read_text())
    for key in ("draftsmith", "rope_parameters", "eagle_aux_hidden_state_layer_ids", "num_aux_hidden_states"):
        config.pop(key, None)
    config |= {"rope_scaling": {"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 2048},
               "rope_theta": 10000, "eagle_config": {"eagle_aux_hidden_state_layer_ids": [0, 1],
                                                     "use_aux_hidden_state": True}}
    (export / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="rope 'yarn'"):
        eagle3_export.read_folder(export, model)
    fixed = modelopt.as_trained(export)
    assert fixed == tmp_path / "1-as-trained" and modelopt.epoch_exports(tmp_path) == [export]
    read = eagle3_export.read_folder(fixed, model)
    assert read.spec.feature_layers == (0, 1)  # vLLM ids 1, 2: the outputs of layers 0 and 1 it trained on
    torch.testing.assert_close(read.reduce.weight, drafter.reduce.weight)
    written = json.loads((export / "config.json").read_text())
    assert written["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [0, 1]  # the export itself is untouched


def test_modelopt_step_records_sum_to_the_training_seconds_and_tokens(tmp_path):
    (tmp_path / "steps.jsonl").write_text('{"seconds": 1.25, "scored": 100}\n{"seconds": 0.5, "scored": 60}\n')
    assert modelopt.read_steps(tmp_path) == {"steps": 2, "train_seconds": 1.8, "scored_tokens": 160}
