"""The compiled path (``nn.Module.compile()``: what ``bench/converters.py cost --compile`` and
``quality --compile`` time) equals eager: outputs, the regularisers and every parameter's
gradient, one preset per design at tiny widths on the CPU (inductor's C++ backend)."""
import copy

import pytest
import torch

from tests.tokconv.test_converters import TINY_STUDENT, TINY_TARGETS
from tokconv import create_converter

DESIGNS = ["baseline_interp_linear", "convmix_small", "perceiver_small", "ssm_small",
           "tokenlearner_small"]


# A's and D's cheap decode (factored skip, shared decode) too
CASES = [(n, {}) for n in DESIGNS] + [
    ("perceiver_small", {"skip_rank": 4, "shared_decode": True}),
    ("tokenlearner_small", {"skip_rank": 4, "shared_decode": True})]


@pytest.mark.parametrize("name,kw", CASES, ids=lambda v: ",".join(v) if isinstance(v, dict) else v)
def test_compiled_forward_and_backward_equal_eager(name, kw):
    torch.manual_seed(0)
    eager = create_converter(name, student=TINY_STUDENT, targets=TINY_TARGETS, **kw).train()
    compiled = copy.deepcopy(eager)
    compiled.compile()
    x = torch.randn(2, TINY_STUDENT.tokens, TINY_STUDENT.dim)
    grads = {n: torch.randn(2, s.tokens, s.dim) for n, s in TINY_TARGETS.items()}
    results = []
    for model in (eager, compiled):
        out = model(x)
        regs = model.regularisers()
        loss = sum((out[n] * grads[n]).sum() for n in out) + sum(r for r in regs.values())
        loss.backward()
        results.append((out, regs, {k: p.grad for k, p in model.named_parameters()}))
    (out_e, reg_e, grad_e), (out_c, reg_c, grad_c) = results
    assert sorted(out_c) == sorted(out_e) and sorted(reg_c) == sorted(reg_e)
    for n in out_e:
        torch.testing.assert_close(out_c[n], out_e[n], rtol=1e-4, atol=1e-5)
    for n in reg_e:
        torch.testing.assert_close(reg_c[n], reg_e[n], rtol=1e-4, atol=1e-5)
    assert sorted(grad_c) == sorted(grad_e)
    for k, g in grad_e.items():
        assert g is not None and grad_c[k] is not None, k
        # weight gradients sum over every token: fp32 rounding scales with their largest entry
        atol = 1e-5 + 1e-6 * float(g.abs().max())
        torch.testing.assert_close(grad_c[k], g, rtol=1e-3, atol=atol, msg=k)
