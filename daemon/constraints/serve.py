"""Structured output in `mlx_lm.server` (mlx-lm 0.32), applied by `mlx_lm_entry` the way it applies
its other patches: by wrapping a few of the server's parts. `install` composes with them in any
order (each wraps what it finds), `batch_loop` included.

One request's way:

- HTTP thread, `APIHandler.handle_completion` (wrapped): read the body, build the request's
  processor (`decoding.processor_for`: the schema check, the grammar, llguidance's matcher; a few
  ms, microseconds for the check of a schema seen before). A refusal answers 400 here, before
  anything is queued. The processor waits in a thread-local.
- same thread, `ResponseGenerator.generate` (wrapped): the processor goes onto the request's
  GenerationArguments (`args.constraint`), which travel to the generation thread with the request.
- generation thread, `ResponseGenerator._tokenize` (wrapped): tells the processor whether the
  prompt leaves the model inside a reasoning block.
- generation thread, `server._make_logits_processors` (replaced; both the batched loop and the
  sequential path call it once per request): the request's processors, then its constraint, last,
  so no other processor re-enables a masked token. Nothing here can raise: in the batched loop an
  exception would end the generation thread.
- `ModelProvider.load` (wrapped): the tokenizer's grammar view is built beside the loaded model,
  in a thread of its own, so the first constrained request does not wait for it (0.2-20 s).
"""

from __future__ import annotations

import json
import logging
import threading

from . import decoding
from .schemas import ConstraintError

log = logging.getLogger("mlxgate.constraints")
DEFAULT = "default_model"  # mlx_lm.server's name for the model (and draft model) of its command line


def install(server) -> None:
    """Patch the `mlx_lm.server` module `server` (once; a second call does nothing)."""
    if getattr(server, "_mlxgate_constraints", False):
        return
    server._mlxgate_constraints = True
    on_gpu = server.mx.default_device() == server.mx.gpu
    local = threading.local()
    handler, generator, provider = server.APIHandler, server.ResponseGenerator, server.ModelProvider
    original_handle, original_generate = handler.handle_completion, generator.generate
    original_tokenize, original_make = generator._tokenize, server._make_logits_processors
    original_load = provider.load

    def handle_completion(self, request, stop_words):
        try:
            processor = _processor(self, request, on_gpu)
        except ConstraintError as e:
            return _refuse(self, e.status, str(e), e.code, e.param)
        except _NotNow as e:
            return _refuse(self, 503, str(e), "model_loading", None, "server_error")
        except Exception as e:  # noqa: BLE001 - the grammar view of the tokenizer failed: not the request's fault
            log.exception("structured output: no processor for the request")
            return _refuse(self, 500, f"structured output is not available for this model: {e}", None, None,
                           "server_error")
        local.processor = processor
        try:
            return original_handle(self, request, stop_words)
        finally:
            local.processor = None
            if processor is not None:
                _report(processor)

    def generate(self, request, generation_args, progress_callback=None):
        generation_args.constraint, local.processor = getattr(local, "processor", None), None
        return original_generate(self, request, generation_args, progress_callback)

    def _tokenize(self, tokenizer, request, args):
        tokenized = original_tokenize(self, tokenizer, request, args)
        constraint = getattr(args, "constraint", None)
        if constraint is not None:
            constraint.begin(tokenized[3])  # the initial text state: "normal" or "reasoning"
        return tokenized

    def make_logits_processors(args):
        processors = original_make(args)
        constraint = getattr(args, "constraint", None)
        return processors if constraint is None else [*processors, constraint]

    def load(self, *args, **kwargs):
        model, tokenizer = original_load(self, *args, **kwargs)
        if not decoding.has_grammar_tokenizer(tokenizer):
            threading.Thread(target=_build_grammar_tokenizer, args=(tokenizer,), name="grammar-tokenizer",
                             daemon=True).start()
        return model, tokenizer

    handler.handle_completion, generator.generate, generator._tokenize = handle_completion, generate, _tokenize
    server._make_logits_processors, provider.load = make_logits_processors, load


class _NotNow(Exception):
    pass


def _processor(handler, request, on_gpu: bool):
    """The request's processor (None: nothing held). Raises ConstraintError or _NotNow."""
    body = handler.body
    if request.request_type != "chat":  # a text completion renders no tools: only its response_format counts
        body = {"response_format": body.get("response_format")}
    if not decoding.requested(body):
        return None
    provider = handler.response_generator.model_provider
    if provider.cli_args.draft_model is not None or handler.requested_draft_model not in (None, DEFAULT):
        raise ConstraintError("draft_model", "structured output is not available with a draft model (speculative "
                                             "decoding); serve the model without one")
    if provider.tokenizer is None:
        raise _NotNow("the model is still loading; retry in a few seconds")
    # Overlap the forward pass with the mask on a GPU; on the CPU backend only in a batch (a `seed`
    # makes mlx_lm serve the request alone), where it costs the other rows less.
    batched = provider.is_batchable and handler.seed is None
    return decoding.processor_for(body, provider.tokenizer, overlap=on_gpu or batched)


def _refuse(handler, status: int, message: str, code: str | None, param: str | None,
            kind: str = "invalid_request_error") -> None:
    body = json.dumps({"error": {"message": message, "type": kind, "code": code, "param": param}}).encode()
    handler._set_completion_headers(status)
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


def _report(processor: decoding.ConstrainedLogits) -> None:
    if processor.error:
        log.warning("structured output (%s) stopped the answer early: %s", processor.spec.kind, processor.error)
    steps = max(1, processor.masked_steps)
    log.info("structured output (%s): %d masked steps, mask %.0f us/step, processor CPU %.0f us/step",
             processor.spec.kind, processor.masked_steps, processor.mask_seconds / steps * 1e6,
             processor.cpu_seconds / steps * 1e6)


def _build_grammar_tokenizer(tokenizer) -> None:
    try:
        decoding.grammar_tokenizer(tokenizer)
    except Exception:  # noqa: BLE001 - a request that needs it will build it again and answer the error
        log.exception("structured output: the tokenizer's grammar view could not be built")
