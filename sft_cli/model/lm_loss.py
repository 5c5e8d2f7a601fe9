"""Causal-LM loss without the full `[tokens x vocab]` logits.

Positions whose label is ignored are dropped *before* the output projection (in prompt-masked SFT most
of them are), and the remaining rows are projected and scored in chunks, in fp32 per chunk. For a plain
`nn.Linear` head a custom autograd function computes each chunk's gradients during the forward pass (the
approach of Liger's fused linear cross-entropy, in plain PyTorch: no chunk's logits are kept or recomputed);
other heads (PEFT wrappers) fall back to checkpointing each chunk. On CUDA, Liger's fused kernel is used when
it is installed and `engine.kernels: auto`. The wrapper puts model and loss in one `forward`, so DDP, FSDP and
torch.compile see a single module.
"""

from __future__ import annotations

import logging
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger("sft")
TRIM_FROM_BYTES = 64 << 20  # embedding matrices this large get the heap trimmed before their gradient is made
CHUNK_BYTES = 2**25  # fp32 logits per chunk: 32 MiB (~55 tokens at a 152k vocabulary; 128 MiB cost +190 MB RSS)


def chunk_rows(vocab: int) -> int:
    """Rows per chunk so one chunk's fp32 logits stay near CHUNK_BYTES."""
    return max(16, CHUNK_BYTES // (4 * vocab))


def _chunks(hidden, weight, bias, labels, weights, rows, compute, total, grad_hidden, grad_weight, grad_bias) -> None:
    """The chunk loop of _LinearCrossEntropy.forward: accumulate the loss and the gradients in place.

    Every chunk reuses the same logits buffers: at a 152k vocabulary one chunk's fp32 logits are ~32 MiB, and
    allocating them afresh per chunk (mapped and faulted in by the OS each time) cost time and left freed memory
    in the process's heap.
    """
    w_compute = weight.to(compute)
    size = (min(rows, hidden.shape[0]), weight.shape[0])
    logits_buffer = torch.empty(size, dtype=torch.float32, device=hidden.device)
    low_buffer = None if compute == torch.float32 else torch.empty(size, dtype=compute, device=hidden.device)
    for start in range(0, hidden.shape[0], rows):
        h = hidden[start : start + rows].to(compute)
        y, w = labels[start : start + rows], weights[start : start + rows].float()
        logits = logits_buffer[: len(y)]
        if low_buffer is None:
            torch.mm(h, w_compute.T, out=logits)
        else:
            logits.copy_(torch.mm(h, w_compute.T, out=low_buffer[: len(y)]))
        if bias is not None:
            logits += bias.float()
        # One exp pass, in place (elementwise passes over [rows x vocab] cost as much as the matmuls on CPU):
        # loss = logsumexp - target; d(sum w*CE)/d logits = w * softmax - w * onehot.
        target = logits.gather(1, y[:, None]).squeeze(1)
        peak = logits.amax(dim=-1, keepdim=True)
        logits.sub_(peak).exp_()
        norm = logits.sum(dim=-1)
        total += ((peak.squeeze(1) + norm.log() - target) * w).sum()
        if grad_hidden is None and grad_weight is None and grad_bias is None:
            continue
        grad = logits.mul_((w / norm)[:, None])
        grad[torch.arange(len(y), device=grad.device), y] -= w
        low = grad if low_buffer is None else low_buffer[: len(y)].copy_(grad)
        if grad_hidden is not None:
            grad_hidden[start : start + rows] = (low @ w_compute).to(grad_hidden.dtype)
        if grad_weight is not None:  # accumulated in the compute dtype, in place: no [vocab x hidden] copies
            grad_weight.addmm_(low.T, h)
        if grad_bias is not None:
            grad_bias += grad.sum(0)


class _LinearCrossEntropy(torch.autograd.Function):
    """sum_i w_i * CE(h_i @ W^T + b, y_i), chunk by chunk; gradients computed in the forward pass."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, weights, rows):  # type: ignore[override]
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        need_hidden, need_weight = hidden.requires_grad, weight.requires_grad
        grad_hidden = torch.empty_like(hidden) if need_hidden else None
        device = hidden.device.type
        compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        grad_weight = torch.zeros(weight.shape, dtype=compute, device=weight.device) if need_weight else None
        grad_bias = (
            torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
            if bias is not None and bias.requires_grad
            else None
        )
        with torch.autocast(device, enabled=False):  # explicit dtypes: matmuls in `compute`, softmax in fp32
            _chunks(hidden, weight, bias, labels, weights, rows, compute, total, grad_hidden, grad_weight, grad_bias)
        # Kept on ctx, not saved tensors: backward scales them in place and hands them over as the only reference,
        # so autograd adopts them as .grad instead of copying (a [vocab x hidden] copy is ~150 MB at a 152k vocab).
        ctx.grads = [grad_hidden, grad_weight, grad_bias]
        ctx.dtypes = (hidden.dtype, weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grads, ctx.grads = ctx.grads, None
        scale = grad_output.to(torch.float32)
        out = []
        for index, dtype in enumerate(ctx.dtypes):
            grad, grads[index] = grads[index], None
            if grad is not None:
                grad = grad.to(dtype)  # the compute-dtype accumulator becomes the parameter's dtype, once
                grad.mul_(scale.to(dtype))
            out.append(grad)
            del grad
        return (*out, None, None, None)


def linear_cross_entropy(
    hidden: torch.Tensor, head: nn.Module, labels: torch.Tensor, weights: torch.Tensor, rows: Optional[int] = None
) -> torch.Tensor:
    """Summed, weighted cross-entropy of `head(hidden)` against `labels`, never holding more than one chunk."""
    vocab = head.weight.shape[0] if hasattr(head, "weight") else head(hidden[:1]).shape[-1]
    rows = rows or chunk_rows(vocab)
    if type(head) is nn.Linear:
        return _LinearCrossEntropy.apply(hidden, head.weight, head.bias, labels, weights, rows)
    from torch.utils.checkpoint import checkpoint

    def chunk(h: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        return (F.cross_entropy(head(h).float(), y, reduction="none") * w.float()).sum()

    return sum(
        checkpoint(chunk, hidden[s : s + rows], labels[s : s + rows], weights[s : s + rows], use_reentrant=False)
        for s in range(0, hidden.shape[0], rows)
    )


def _fused_kernel(device: torch.device, kernels: str) -> Any:
    """Liger's fused linear cross-entropy on CUDA when installed and allowed; else None."""
    if kernels != "auto" or device.type != "cuda":
        return None
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    return LigerFusedLinearCrossEntropyLoss(reduction="sum")


def release_before_embedding_backward(network: nn.Module) -> None:
    """Hand freed memory back to the OS just before the input embedding's gradient is made (glibc only).

    The embedding is the last layer backward reaches: by then every activation is freed, but into the heap,
    where glibc keeps it; the embedding's dense [vocab x hidden] gradient then comes on top of that. Trimming
    the heap at that moment takes ~140 MB off the decoder bench's peak RSS for one malloc_trim per step. Only
    for embeddings of TRIM_FROM_BYTES and more: on a small model the re-faulted heap cost 28% of the tokens/s
    (4-layer GPT-2, 4k vocabulary), on the 152k-vocabulary decoder nothing measurable.
    """
    from sft_cli.model.memory import trim_heap

    def on_output(_module: nn.Module, _inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor) and output.requires_grad:
            output.register_hook(lambda grad: trim_heap())

    embeddings = network.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if weight is None or not trim_heap.available or weight.numel() * weight.element_size() < TRIM_FROM_BYTES:
        return
    embeddings.register_forward_hook(on_output)


class WrappedLM(nn.Module):
    """A causal LM behind a forward of our own that reads its last hidden states (the output head applied apart)."""

    def __init__(self, lm: nn.Module):
        super().__init__()
        self.lm = lm

    @property
    def wrapped(self) -> nn.Module:
        """What `backbone.unwrap` descends into: the language model itself."""
        return self.lm

    def network(self) -> nn.Module:
        """The transformers model (through a PEFT wrapper)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def last_hidden(self, input_ids: torch.Tensor, **inputs: Any) -> torch.Tensor:
        """The decoder's last hidden states, without the output head."""
        network = self.network()
        decoder = getattr(network, network.base_model_prefix)
        return decoder(input_ids=input_ids, use_cache=False, **inputs).last_hidden_state


class CausalLMLoss(WrappedLM):
    """A causal LM and its loss in one forward: hidden states, keep the labelled positions, chunked projection."""

    def __init__(self, lm: nn.Module, kernels: str = "auto"):
        super().__init__(lm)
        self.kernels = kernels

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        label_weights: Optional[torch.Tensor] = None,
        **inputs: Any,
    ) -> torch.Tensor:
        hidden = self.last_hidden(input_ids, **inputs)
        keep = labels != -100
        if label_weights is not None:
            keep &= label_weights != 0
        rows, targets = hidden[keep], labels[keep]  # ignored positions never reach the projection
        weights = label_weights[keep] if label_weights is not None else torch.ones_like(targets, dtype=torch.float32)
        if rows.shape[0] == 0:
            return hidden.sum() * 0.0  # keeps every parameter in the graph (DDP) at zero loss
        head = self.network().get_output_embeddings()
        fused = _fused_kernel(rows.device, self.kernels)
        if fused is not None and type(head) is nn.Linear and bool((weights == 1).all()):
            return fused(head.weight, rows, targets, head.bias)
        return linear_cross_entropy(rows, head, targets, weights)


def plain_loss(model: nn.Module, batch: dict[str, torch.Tensor], **inputs: Any) -> torch.Tensor:
    """The reference: full logits, then the same summed weighted cross-entropy."""
    logits = model(input_ids=batch["input_ids"], use_cache=False, **inputs).logits
    weights = batch.get("label_weights")
    per = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), batch["labels"].reshape(-1), ignore_index=-100, reduction="none"
    )
    return (per * weights.reshape(-1)).sum() if weights is not None else per.sum()


def hidden_loss_matches(model: nn.Module, vocab: int) -> bool:
    """Whether this architecture's logits are exactly head(last hidden state) (no scaling or soft-capping).

    Checked on a short random batch against the model's own logits; architectures that post-process logits
    keep the plain (full-logits) loss.
    """
    network = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not hasattr(network, network.base_model_prefix) or network.get_output_embeddings() is None:
        return False
    generator = torch.Generator().manual_seed(0)
    device = next(network.parameters()).device
    ids = torch.randint(vocab, (2, 9), generator=generator).to(device)
    labels = torch.randint(vocab, (2, 9), generator=generator).to(device)
    labels[:, :3] = -100
    batch = {"input_ids": ids, "labels": labels}
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            ours = CausalLMLoss(model, kernels="none")(ids, labels)
            theirs = plain_loss(model, batch)
        return bool(torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4))
    except Exception as err:  # an architecture whose decoder cannot be called alone
        log.debug("chunked loss unavailable: %s", err)
        return False
    finally:
        network.train(was_training)


def with_loss(model: nn.Module, vocab: int, kernels: str) -> tuple[nn.Module, bool]:
    """(the model wrapped with the chunked loss, True) where that loss equals the plain one; else (model, False)."""
    if hidden_loss_matches(model, vocab):
        wrapped = CausalLMLoss(model, kernels)
        release_before_embedding_backward(wrapped.network())
        return wrapped, True
    log.info("the chunked LM loss does not match this architecture's logits; using full logits")
    return model, False


def causal_lm_loss(
    model: nn.Module,
    chunked: bool,
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    weights: Optional[torch.Tensor] = None,
    **inputs: Any,
) -> torch.Tensor:
    """Summed (weighted) next-token loss, labels already shifted: chunked without full logits, or plain."""
    if chunked:
        return model(input_ids, labels, weights, **inputs)
    from sft_cli.model.losses import summed_cross_entropy

    logits = model(input_ids=input_ids, use_cache=False, **inputs).logits
    return summed_cross_entropy(logits, labels, weights)


# ---------------------------------------------------------------------------------------------
# Encoder-decoder models (T5, BART, Marian, mBART, NLLB, Pegasus): the same loss on the decoder's hidden states


def decoder_inputs(network: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """The decoder's inputs for `labels`: the model's own shift (mBART wraps its language token) where it has one,
    else the labels shifted right behind `decoder_start_token_id`, ignored positions as padding."""
    prepare = getattr(network, "prepare_decoder_input_ids_from_labels", None)
    if prepare is not None:
        return prepare(labels=labels)
    config = network.config
    shifted = labels.new_full(labels.shape, config.pad_token_id)
    shifted[:, 1:] = labels[:, :-1]
    shifted[:, 0] = config.decoder_start_token_id
    return shifted.masked_fill(shifted == -100, config.pad_token_id)


def _output_bias(network: nn.Module, head: nn.Module) -> Optional[torch.Tensor]:
    """The bias added to the logits: the head's own plus a `final_logits_bias` buffer (BART, Marian, Pegasus)."""
    extra = getattr(network, "final_logits_bias", None)
    bias = getattr(head, "bias", None)
    if extra is None:
        return bias
    extra = extra.reshape(-1)
    return extra if bias is None else bias + extra


class Seq2SeqLMLoss(nn.Module):
    """An encoder-decoder model and its target-token loss in one forward, without the full logits."""

    def __init__(self, lm: nn.Module, kernels: str = "auto"):
        super().__init__()
        self.lm = lm
        self.kernels = kernels

    @property
    def wrapped(self) -> nn.Module:
        """What `backbone.unwrap` descends into: the model itself."""
        return self.lm

    def network(self) -> nn.Module:
        """The transformers model (through a PEFT wrapper)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor, **_: Any
    ) -> torch.Tensor:
        network = self.network()
        encoded = network.get_encoder()(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = network.get_decoder()(
            input_ids=decoder_inputs(network, labels),
            encoder_hidden_states=encoded,
            encoder_attention_mask=attention_mask,
            use_cache=False,
        ).last_hidden_state
        if getattr(network.config, "scale_decoder_outputs", False):  # T5 with tied embeddings
            hidden = hidden * (network.config.d_model**-0.5)
        keep = labels != -100
        rows, targets = hidden[keep], labels[keep]
        if rows.shape[0] == 0:
            return hidden.sum() * 0.0
        head = network.get_output_embeddings()
        weights = torch.ones_like(targets, dtype=torch.float32)
        if type(head) is nn.Linear:
            bias = _output_bias(network, head)
            return _LinearCrossEntropy.apply(
                rows, head.weight, bias, targets, weights, chunk_rows(head.weight.shape[0])
            )
        return linear_cross_entropy(rows, head, targets, weights)


def plain_seq2seq_loss(
    model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """The reference: the model's full logits, summed cross-entropy over the target tokens."""
    from sft_cli.model.backbone import unwrap
    from sft_cli.model.losses import summed_cross_entropy

    network = unwrap(model)  # through DDP / compile: the model that knows its decoder's start token
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        decoder_input_ids=decoder_inputs(network, labels),
        use_cache=False,
    ).logits
    return summed_cross_entropy(logits, labels)


def with_seq2seq_loss(model: nn.Module, vocab: int, kernels: str) -> tuple[nn.Module, bool]:
    """(the model wrapped with the chunked loss, True) where it equals the model's own logits' loss on a random
    batch; else (model, False): the full-logits loss."""
    network = model.get_base_model() if hasattr(model, "get_base_model") else model
    generator = torch.Generator().manual_seed(0)
    device = next(network.parameters()).device
    ids = torch.randint(vocab, (2, 7), generator=generator).to(device)
    mask = torch.ones_like(ids)
    labels = torch.randint(vocab, (2, 5), generator=generator).to(device)
    labels[1, 3:] = -100
    was_training = network.training
    network.eval()
    try:
        with torch.no_grad():
            ours = Seq2SeqLMLoss(model, kernels="none")(ids, mask, labels)
            theirs = plain_seq2seq_loss(model, ids, mask, labels)
        matches = bool(torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4))
    except Exception as err:  # an architecture whose encoder or decoder cannot be called alone
        log.debug("chunked seq2seq loss unavailable: %s", err)
        matches = False
    finally:
        network.train(was_training)
    if matches:
        return Seq2SeqLMLoss(model, kernels), True
    log.info("the chunked loss does not match this encoder-decoder's logits; using full logits")
    return model, False


def seq2seq_loss(model: nn.Module, chunked: bool, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed target-token loss of an encoder-decoder batch (input_ids, attention_mask, labels)."""
    if chunked:
        return model(batch["input_ids"], batch["attention_mask"], batch["labels"])
    return plain_seq2seq_loss(model, batch["input_ids"], batch["attention_mask"], batch["labels"])
