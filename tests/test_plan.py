"""polyko.plan: FLOPs against torch's own FLOP counter, memory arithmetic, fit decisions, time estimates."""

from __future__ import annotations

import math

import pytest
import torch

from polyko import plan as P
from polyko.model import PRESETS, RELEASED_PARAMS, build_config, count_params


def _counted_flops_per_token(config, seq_len: int, batch: int = 2, checkpointing: bool = False) -> float:
    """Forward + backward FLOPs per token as torch.utils.flop_counter counts the real ops.

    Eager attention: the counter has no formula for the CPU flash-attention kernel SDPA uses,
    so with SDPA the s x s attention matmuls would be missing from the count."""
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import GPTNeoXForCausalLM

    config._attn_implementation = "eager"
    torch.manual_seed(0)
    model = GPTNeoXForCausalLM(config)
    model.train()
    if checkpointing:
        model.config.use_cache = False
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    ids = torch.randint(4, config.vocab_size, (batch, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, labels=ids).loss.backward()
    return counter.get_total_flops() / (batch * seq_len)


def _deep_config():
    """Small vocabulary, more layers, long sequence: attention is ~25% of the FLOPs (in ``tiny`` the
    output embedding dominates), so both terms of 6N + 12Lhs are checked."""
    cfg = build_config("tiny", vocab_size=512)
    cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size = 128, 4, 4, 512
    return cfg


@pytest.mark.parametrize("name,seq_len", [("tiny", 256), ("deep", 512)])
def test_flops_per_token_matches_torch_flop_counter(name, seq_len):
    cfg = build_config("tiny") if name == "tiny" else _deep_config()
    predicted = P.flops_per_token(cfg, seq_len)
    counted = _counted_flops_per_token(cfg, seq_len)
    assert counted == pytest.approx(predicted, rel=0.02)
    # The attention term is not negligible in the deep config: dropping it would miss by > 10%.
    if name == "deep":
        assert 6 * P.matmul_params(cfg) < 0.9 * counted


def test_recompute_flops_are_hardware_flops():
    cfg = _deep_config()
    model_flops = P.flops_per_token(cfg, 256)
    hardware = P.flops_per_token(cfg, 256, recompute=True)
    counted = _counted_flops_per_token(cfg, 256, checkpointing=True)
    # torch's non-reentrant checkpoint stops recomputing once every saved tensor is back, so it
    # skips each layer's last matmul: the GPU does slightly less than the 8N convention.
    assert counted == pytest.approx(hardware, rel=0.10)
    assert counted > 1.15 * model_flops


def test_matmul_params_is_an_independent_count_of_matmul_weights():
    """N of the formula = every 2-D weight but the input embedding, counted on the meta device."""
    from transformers import GPTNeoXForCausalLM

    for size in ("tiny", "1.3b", "5.8b"):
        cfg = build_config(size)
        with torch.device("meta"):
            model = GPTNeoXForCausalLM(cfg)
        n = sum(p.numel() for name, p in model.named_parameters() if p.ndim == 2 and "embed_in" not in name)
        assert P.matmul_params(cfg) == n, size


@pytest.mark.parametrize("size", ["1.3b", "3.8b", "5.8b", "12.8b"])
def test_plan_params_are_the_model_parameter_count(size):
    plan = P.make_plan(size, gpus=256, gpu="a100-80gb")
    assert plan.params == count_params(build_config(size))
    assert abs(plan.params - RELEASED_PARAMS[size]) / RELEASED_PARAMS[size] < 5e-4
    # 6N for the total parameter count is within ~15% of the model FLOPs (attention adds, the input
    # embedding subtracts): a sanity check against the rule of thumb everyone uses.
    assert 0.85 < plan.flops_per_token / (6 * plan.params) < 1.25


def test_memory_shrinks_with_each_zero_stage_and_with_more_gpus():
    p8 = P.make_plan("1.3b", gpus=8, gpu="a100-40gb", micro_batch=1)
    m = p8.memory_gib
    assert m[3] < m[2] < m[1] < m[0]
    p64 = P.make_plan("1.3b", gpus=64, gpu="a100-40gb", micro_batch=1)
    assert p64.memory_gib[0] == pytest.approx(m[0])  # stage 0 replicates: GPU count is irrelevant
    for stage in (1, 2, 3):
        assert p64.memory_gib[stage] < m[stage]
    # Stage 3 shards all 16 B/param: going 8 -> 64 GPUs cuts the model states by 8x.
    states = lambda mem: mem.weights + mem.grads + mem.optimizer  # noqa: E731
    assert states(p8.memory[3]) / states(p64.memory[3]) == pytest.approx(8.0)
    # The 16 B/param ZeRO accounting, at stage 0: 1.33B params * 16 B = 19.8 GiB.
    assert states(p8.memory[0]) == pytest.approx(16 * p8.params / P.GIB)
    # One GPU: nothing to shard.
    p1 = P.make_plan("1.3b", gpus=1, gpu="h100", micro_batch=1)
    assert len({round(v, 6) for v in p1.memory_gib.values()}) == 1


def test_activation_checkpointing_saves_memory_and_allows_bigger_micro_batches():
    on = P.make_plan("1.3b", gpus=8, gpu="a100-80gb", micro_batch=4)
    off = P.make_plan("1.3b", gpus=8, gpu="a100-80gb", micro_batch=4, activation_checkpointing=False)
    assert on.memory[0].activations * 5 < off.memory[0].activations
    assert off.hardware_flops_per_token == off.flops_per_token < on.hardware_flops_per_token
    assert P.make_plan("1.3b", gpus=8, gpu="a100-80gb").micro_batch >= \
        P.make_plan("1.3b", gpus=8, gpu="a100-80gb", activation_checkpointing=False).micro_batch


def test_12_8b_does_not_fit_one_a100_40gb():
    plan = P.make_plan("12.8b", gpus=1, gpu="a100-40gb")
    assert not plan.fits
    with pytest.raises(ValueError, match="does not fit") as err:
        P.check_fits(plan)
    assert "memory per GPU" in str(err.value) and "stage 3" in str(err.value)


def test_12_8b_fits_256_a100_80gb_like_the_paper():
    plan = P.check_fits(P.make_plan("12.8b", gpus=256, gpu="a100-80gb"))
    assert plan.fits and plan.zero_stage in (1, 2, 3)
    assert plan.memory_gib[plan.zero_stage] <= plan.gpu_memory_gib
    assert plan.memory_gib[0] > plan.gpu_memory_gib  # plain data parallelism would not fit
    # The paper's batch: 256 x 2048 tokens, one sequence per GPU.
    assert plan.global_batch_tokens == 256 * 2048
    assert plan.micro_batch * plan.gpus * plan.grad_accum == plan.global_batch_seqs
    # The chosen stage is the lowest that fits.
    assert all(plan.memory_gib[s] > plan.gpu_memory_gib for s in range(plan.zero_stage))
    text = plan.render()
    for needle in ("12.8b on 256 x a100-80gb", "ZeRO stage", "tokens/s", "days", "stage 0"):
        assert needle in text


def test_chosen_micro_batch_is_the_largest_power_of_two_that_fits():
    plan = P.make_plan("1.3b", gpus=8, gpu="a100-40gb")
    mb = plan.micro_batch
    assert mb & (mb - 1) == 0 and plan.fits
    bigger = P.make_plan("1.3b", gpus=8, gpu="a100-40gb", zero_stage=plan.zero_stage, micro_batch=2 * mb)
    assert not bigger.fits  # 1024 seqs / 8 GPUs = 128 per GPU, so only memory stops it
    assert plan.micro_batch * plan.gpus * plan.grad_accum == plan.global_batch_seqs == 1024


def test_paper_token_budgets_and_batches():
    """1.3b: 213B tokens over 102,000 steps (model card) -> a 2M-token batch."""
    p = P.make_plan("1.3b", gpus=256, gpu="a100-40gb")
    assert p.tokens == 213e9 and p.global_batch_tokens == 2_097_152
    assert p.steps == pytest.approx(102_000, rel=0.01)
    assert P.make_plan("12.8b", gpus=256, gpu="a100-80gb").tokens == 167e9
    assert P.make_plan("tiny", gpus=1, gpu="h100").tokens == 20 * count_params(build_config("tiny"))


def test_days_follow_from_flops_gpus_and_mfu():
    p = P.make_plan("12.8b", gpus=256, gpu="a100-80gb", mfu=0.45)
    total_flops = p.tokens * p.flops_per_token
    assert p.days * 86400 == pytest.approx(total_flops / (256 * 312e12 * 0.45))
    assert P.make_plan("12.8b", gpus=256, gpu="a100-80gb", mfu=0.225).days == pytest.approx(2 * p.days)
    assert P.make_plan("12.8b", gpus=512, gpu="a100-80gb").days == pytest.approx(p.days / 2)
    # Same FLOPs on H100s: faster by the peak ratio.
    assert P.make_plan("12.8b", gpus=256, gpu="h100").days == pytest.approx(p.days * 312 / 989)
    # Order of magnitude vs the paper: 256 A100s for a few days to weeks, not hours or years.
    assert 1 < p.days < 60


def test_mfu_and_tflops_arithmetic():
    fpt = P.flops_per_token(build_config("1.3b"), 2048)
    tokens_per_s = 989e12 / fpt  # exactly one H100's peak
    assert P.mfu(tokens_per_s, fpt, 1, 989) == pytest.approx(1.0)
    assert P.mfu(4 * tokens_per_s, fpt, 8, 989) == pytest.approx(0.5)
    assert P.tflops(tokens_per_s, fpt) == pytest.approx(989)
    with pytest.raises(ValueError):
        P.mfu(1.0, fpt, 1, None)


def test_bad_inputs_are_clear_value_errors():
    with pytest.raises(ValueError, match="known: a100-40gb"):
        P.make_plan("1.3b", gpus=8, gpu="v100")
    with pytest.raises(ValueError, match="unknown model size"):
        P.make_plan("7b", gpus=8, gpu="h100")
    with pytest.raises(ValueError, match="gpus"):
        P.make_plan("1.3b", gpus=0, gpu="h100")
    with pytest.raises(ValueError, match="cannot be spread over 300 GPUs"):
        P.make_plan("1.3b", gpus=300, gpu="h100", global_batch_tokens=256 * 2048)


def test_micro_batch_is_a_maximum_and_uneven_batches_stay_exact():
    """As the trainer's BatchLayout: a micro-batch that does not divide the per-GPU sequences means more, smaller
    micro-steps; a global batch the GPUs do not divide is kept (the busiest GPU is planned), never rounded."""
    p = P.make_plan("1.3b", gpus=8, gpu="h100", micro_batch=3)          # 128 seqs per GPU
    assert p.micro_batch == 3 and p.grad_accum == 43 and p.global_batch_seqs == 1024
    p = P.make_plan("12.8b", gpus=248, gpu="a100-80gb", global_batch_tokens=256 * 2048, stages=(1, 2, 3))
    assert p.global_batch_seqs == 256 and p.fits and p.zero_stage >= 1          # 8 nodes' worth of GPUs lost
    assert p.micro_batch * p.grad_accum == 2 and any("1 or 2 per GPU" in n for n in p.notes)
    # bf16 runs never get stage 0 from the automatic choice (DeepSpeed would accumulate in bf16).
    assert P.make_plan("tiny", gpus=1, gpu="h100", stages=(1, 2, 3)).zero_stage == 1
    assert P.make_plan("tiny", gpus=1, gpu="h100").zero_stage == 0


def test_cpu_plan_picks_the_cheapest_stage_that_fits_host_ram():
    small = P.make_cpu_plan("tiny", workers=2, host_memory_gib=4, seq_len=64, micro_batch=16)
    assert small.fits and small.zero_stage == 0 and "CPU plan" in small.render()
    mem = P.make_cpu_plan("50m", workers=4, host_memory_gib=64, seq_len=256, micro_batch=1).memory_gib
    assert mem[0] > mem[1] and mem[0] > mem[3]   # sharding the 8-12 B/param of Adam state saves host RAM
    tight = P.make_cpu_plan("50m", workers=4, host_memory_gib=(mem[0] + mem[1]) / 2, seq_len=256, micro_batch=1)
    assert tight.fits and tight.zero_stage == 1  # the cheapest stage that fits, not the most sharded
    assert P.make_cpu_plan("50m", workers=4, host_memory_gib=64, seq_len=256, micro_batch=1, zero_stage=2).zero_stage == 2
    assert not P.make_cpu_plan("12.8b", workers=2, host_memory_gib=64, seq_len=2048, micro_batch=1).fits
    with pytest.raises(ValueError, match="zero_stage"):
        P.make_plan("1.3b", gpus=8, gpu="h100", zero_stage=4)


@pytest.mark.parametrize("name,mem,key", [
    ("NVIDIA A100-SXM4-40GB", 39.4, "a100-40gb"), ("NVIDIA A100-SXM4-80GB", 79.2, "a100-80gb"),
    ("NVIDIA A100 80GB PCIe", 79.2, "a100-80gb"), ("NVIDIA A100-PCIE-40GB", 39.4, "a100-40gb"),
    ("NVIDIA H100 80GB HBM3", 79.1, "h100"), ("NVIDIA H100 PCIe", 79.1, "h100-pcie"),
    ("NVIDIA H100 NVL", 93.1, "h100-nvl"), ("NVIDIA H200", 139.8, "h200"), ("NVIDIA GH200 480GB", 95.0, "h200"),
    ("Tesla V100-SXM2-16GB", 15.8, None),
])
def test_gpu_names_map_to_peaks(name, mem, key):
    assert P.gpu_key(name, mem) == key
    if key:
        assert key in P.PEAK_TFLOPS and key in P.GPU_MEMORY_GIB


def test_detect_accelerator_matches_this_machine():
    name, peak = P.detect_accelerator()
    if not torch.cuda.is_available():
        assert (name, peak) == ("cpu", None)
    else:
        assert name and (peak is None or peak in P.PEAK_TFLOPS.values())


def test_cli_exit_status_says_whether_it_fits(capsys):
    assert P.main(["--size", "1.3b", "--gpus", "8", "--gpu", "h100"]) == 0
    assert "1.3b on 8 x h100" in capsys.readouterr().out
    assert P.main(["--size", "12.8b", "--gpus", "1", "--gpu", "a100-40gb"]) == 1
    assert "does not fit" in capsys.readouterr().out


def test_every_preset_plans():
    for size in PRESETS:
        plan = P.make_plan(size, gpus=8, gpu="h200")
        assert plan.fits and plan.tokens_per_s > 0 and math.isfinite(plan.days)
