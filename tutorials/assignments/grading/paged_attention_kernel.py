"""paged_attention_kernel: bug classes and the Triton integrity check."""

from __future__ import annotations

import ast

from .core import BUG_HINTS, DESCRIPTIONS, Failure, check, test
from .integrity import _check_imports, _Imports

# =========================================================================================== paged_attention_kernel

DESCRIPTIONS["paged_attention_kernel"] = "a Triton paged-attention kernel (run by the interpreter on CPU)"
PA = "paged_attention_kernel"

PA_NOT_TRITON = "not a Triton kernel"
PA_DRESSED = "PyTorch dressed up as Triton"
PA_SHORTCUT = "library shortcut"
PA_SCALE = "softmax scale"
PA_CAUSAL = "off-by-one causal mask"
PA_NO_CAUSAL = "no causal mask"
PA_QPOS = "query position"
PA_GQA = "GQA head mapping"
PA_WINDOW = "sliding-window bound"
PA_WINDOW_IGNORED = "window ignored"
PA_TABLE = "block-table lookup"
PA_NAN = "reads freed blocks"
PA_ONLINE = "online softmax across tiles"
PA_LAYOUT = "output layout"
PA_OUTPUT = "attention output differs"
PA_NORM = "output not normalised by l"
PA_PRECISION = "low-precision accumulation"
PA_HEAD_DIM = "head-dim padding not masked"
PA_MAX_INIT = "running max initialised to 0"
PA_STRIDES = "strides assumed contiguous"
PA_LOOP = "key loop bounds"

# torch functions / tensor methods that compute attention (or its pieces): forbidden outside @triton.jit code
_TORCH_MATH = {"softmax", "log_softmax", "softmin", "matmul", "mm", "bmm", "baddbmm", "addbmm", "addmm", "addmv",
               "mv", "einsum", "tensordot", "dot", "vdot", "inner", "outer", "ger", "kron", "chain_matmul",
               "scaled_dot_product_attention", "multi_head_attention_forward", "linear", "bilinear", "exp", "exp_",
               "exp2", "expm1", "logsumexp", "sigmoid", "__matmul__", "__rmatmul__", "_scaled_dot_product_attention",
               "_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
               "_safe_softmax", "_softmax"}  # fmt: skip


def _jit_functions(tree, imp: _Imports) -> dict[str, ast.FunctionDef]:
    jit = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for d in node.decorator_list:
                path = imp.resolve(d.func if isinstance(d, ast.Call) else d) or ""
                if path.split(".")[0] == "triton" and path.split(".")[-1] == "jit":
                    jit[node.name] = node
    return jit


def check_triton_integrity(mod) -> None:
    """From the syntax tree: a @triton.jit kernel exists and ``paged_attention`` launches it (``kernel[grid](...)``,
    directly or through a helper it calls); no torch attention math outside the kernel (softmax, matmul / @, einsum,
    bmm, exp, scaled_dot_product_attention, torch.nn.functional ...); no torch inside the kernel."""
    _check_imports(mod, ("minimtp.errors",), PA_SHORTCUT)
    tree = ast.parse(mod.__source__)
    imp = _Imports(tree)
    for name, line in imp.modules:
        if name.split(".")[0] in ("kernels",) or name.startswith("minimtp.kernels"):
            raise Failure(PA_SHORTCUT, f"line {line}: imports {name}, the project's own kernel")
    jit = _jit_functions(tree, imp)
    check(jit, PA_NOT_TRITON, "no @triton.jit function in the file")
    funcs = {n.name: n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    check("paged_attention" in funcs, PA_NOT_TRITON, "no function paged_attention (the wrapper) in the file")
    torch_roots = {k for k, v in imp.names.items() if v.split(".")[0] in ("torch", "numpy")} | {"torch", "numpy"}

    def launches(fn, seen=()) -> bool:
        for node in ast.walk(fn):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Subscript):
                target = node.func.value
                if isinstance(target, ast.Name) and target.id in jit:
                    return True
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in funcs:
                callee = node.func.id
                if callee not in seen and callee not in jit and launches(funcs[callee], (*seen, callee)):
                    return True
        return False

    check(
        launches(funcs["paged_attention"], ("paged_attention",)),
        PA_NOT_TRITON,
        f"paged_attention never launches a @triton.jit kernel (kernel[grid](...)); kernels: {sorted(jit)}",
    )
    for fname, fn in jit.items():  # the kernel body: triton.language only
        for node in ast.walk(fn):
            if isinstance(node, ast.Name) and node.id in torch_roots:
                raise Failure(
                    PA_DRESSED,
                    f"line {node.lineno}: the @triton.jit function {fname} uses {node.id}: a "
                    "kernel is compiled for the GPU, where torch does not exist (use triton.language)",
                )
    jit_nodes = {id(n) for f in jit.values() for n in ast.walk(f)}
    for node in ast.walk(tree):  # everything outside the kernels: no attention math with torch
        if id(node) in jit_nodes:
            continue
        bad = ""
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            bad = "the @ operator (a matrix product)"
        elif isinstance(node, ast.Attribute):
            path = imp.resolve(node) or ""
            root = path.split(".")[0]
            if root in ("torch", "numpy") and (
                node.attr in _TORCH_MATH
                or ".functional" in "." + path
                or path.startswith("torch.special")
                or path.startswith("torch._C")
            ):
                bad = path  # fmt: skip
            elif root not in ("torch", "numpy", "triton", "math", "tl") and node.attr in _TORCH_MATH:
                bad = f".{node.attr}() on a tensor"
        elif isinstance(node, ast.Name):
            path = imp.names.get(node.id, "")
            if path.split(".")[0] in ("torch", "numpy") and (path.split(".")[-1] in _TORCH_MATH
                                                             or ".functional" in path):  # fmt: skip
                bad = path
        if bad:
            raise Failure(PA_DRESSED, f"line {node.lineno}: {bad} outside the @triton.jit kernel: the attention "
                          "(scores, softmax, weighted sum) must be computed by the kernel; the wrapper only "
                          "allocates the output, computes the launch arguments and launches it")  # fmt: skip


# fmt: off
BUG_HINTS.update({
    PA_DRESSED: "compute the scores, the online softmax and the weighted sum of V inside the @triton.jit kernel; the "
    "wrapper only allocates, computes launch arguments and launches.",
    PA_NOT_TRITON: "define a @triton.jit kernel and launch it from paged_attention with kernel[grid](...).",
    PA_SCALE: "scores are (k . q) * scale with the `scale` argument (not 1, not 1/sqrt(head_dim) unless that is "
    "what was passed, and only once).",
    PA_CAUSAL: "query r of a sequence sits at position seq_len - q_len + r and sees keys j <= that position: an "
    "off-by-one passes decode and fails verify / prefill.",
    PA_NO_CAUSAL: "mask on absolute positions: query at position pos sees keys j <= pos only (in a verify step the "
    "drafts after it are already in the cache).",
    PA_QPOS: "the absolute position of query r is seq_len - q_len + r (the cached prefix comes first).",
    PA_GQA: "query head h reads KV head h // (Hq / Hkv): consecutive query heads share a KV head.",
    PA_WINDOW: "sliding window W: query at pos sees keys pos - W < j <= pos, i.e. W keys, from max(pos - W + 1, 0).",
    PA_WINDOW_IGNORED: "apply the window to every tile (mask j > pos - window), not only to where the loop starts.",
    PA_TABLE: "every key needs its own block: block = table[kpos // BLOCK_SIZE], slot kpos % BLOCK_SIZE.",
    PA_NAN: "mask every K/V load with the visible-key mask (other=0): masked-off lanes must not read freed blocks or "
    "block 0 through a masked table load.",
    PA_ONLINE: "online softmax across tiles: m_new = max(m, max(s)); acc and l are rescaled by exp(m - m_new) before "
    "adding the new tile.",
    PA_NORM: "the output is acc / l: divide by the softmax denominator at the end.",
    PA_PRECISION: "load q, K, V as fp32 (.to(tl.float32)) and keep m, l and acc in fp32.",
    PA_HEAD_DIM: "a head dim D that is not a power of two is padded to D_PAD: mask d < HEAD_D on every q / K / V load "
    "and on the store.",
    PA_MAX_INIT: "start the running max m at -inf: with m = 0, exp(s - m) underflows when every score is very "
    "negative and l ends at 0.",
    PA_LOOP: "loop over the key tiles from the first visible key lo = max(pos - window + 1, 0) (0 without a "
    "window) to the query's own position pos INCLUSIVE: range(lo, pos + 1, TILE_N); the masks cannot bring back a "
    "key the loop never visits, and a row that visits none ends with l = 0 (0 / 0 = NaN).",
    PA_STRIDES: "address q, out and the pools with the strides the wrapper passes (stride_kh, not HEAD_D): a view "
    "of a fused buffer is not contiguous.",
})
# fmt: on


@test(PA, "write the kernel in Triton: a @triton.jit function that paged_attention launches with kernel[grid](...); "
      "the wrapper only allocates (torch.empty...), computes the launch arguments (strides, triton.cdiv, "
      "repeat_interleave ...) and launches; all the attention math lives in the kernel.", bug=PA_DRESSED,
      gate=True)  # fmt: skip
def is_a_triton_kernel(mod):
    check_triton_integrity(mod)
