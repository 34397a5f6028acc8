"""Hook specifications: the plugin author's reference.

tokenprune finds stage plugins through the ``tokenprune`` entry-point group; the built-in stages
are declared there too, in tokenprune's own ``pyproject.toml``, and load by the same path. An
entry point names a module (or object) that implements one or more of the hooks below with
:data:`hookimpl`::

    # my_pkg/stages.py
    import tokenprune
    from tokenprune.stages import Scorer

    class Centre(Scorer):
        \"\"\"Prefer tokens near the image centre.\"\"\"
        permutation_invariant = False
        sharpness: float = 1.0

        def score(self, tokens, fused):
            pos = tokens.positions                                   # (B, M, 2)
            centre = pos.mean(1, keepdim=True)                        # (B, 1, 2)
            return -self.sharpness * (pos - centre).norm(dim=-1)      # (B, M)

    @tokenprune.hookimpl
    def register_scorers(register):
        register("centre", Centre)

    # my_pkg's pyproject.toml
    [project.entry-points.tokenprune]
    my_pkg = "my_pkg.stages"

After ``pip install my_pkg``, ``tokenprune plugins`` lists ``centre`` and a spec can say
``[scoring] stage = "centre"``.

Every hook here is a *catalogue* hook: tokenprune calls it once per plugin with a ``register``
callback, ``register(name, stage_class)``. The host owns the registry: a name registered twice
is an error naming both distributions; a class of the wrong kind is an error. Names are unique
within a kind, so a scorer and a completion may both be called ``random``.

The stage classes are pydantic models (:mod:`tokenprune.stages`): their fields are the stage's
parameters, validated from the spec with ``extra="forbid"``. Shapes use one alphabet: ``B``
batch, ``M`` visual tokens, ``K`` kept (``K1`` pivots + ``K2`` completion), ``L`` encoder layers,
``H`` heads, ``Dv`` encoder width, ``D`` decoder width. All tensors of one call share a device;
features may be float32, float16 or bfloat16, and stages return them in the input dtype. Scores
are float32. Stages must never modify their inputs, must handle ``B > 1`` with a validity mask
``(B, M)`` (rows may have different token counts), and must not loop in Python over tokens or
batch rows. Randomness is seeded and per sample (:func:`tokenprune.ops.hash_uniform`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

from .stages import BudgetPolicy, Completion, Fusion, LlmPruner, Router, Scorer, Selector

if TYPE_CHECKING:
    from .adapters.base import Adapter
    from .cli import Commands

__all__ = ["hookspec", "hookimpl", "PROJECT"]

PROJECT = "tokenprune"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# ---------------------------------------------------------------------------------------------
# routing
# ---------------------------------------------------------------------------------------------
@hookspec
def register_routers(register: Callable[[str, type[Router]], None]) -> None:
    """Register question routers: prompt text -> class and confidence.

    :param register: call ``register(name, cls)`` for each router, ``cls`` a subclass of
        :class:`tokenprune.stages.Router`.

    A router implements ``route(prompts) -> Routing``:

    - ``prompts``: ``Sequence[str]`` of length ``B``, the question text only (no image tokens,
      never the answer).
    - returns :class:`tokenprune.contract.Routing` with ``classes``, a ``B``-tuple of names from
      :data:`tokenprune.classes.CLASSES` (``general`` is the fallback), and ``confidence``, a
      ``(B,)`` float32 CPU tensor in ``[0, 1]``.

    Routers run before the vision encoder, on the CPU, and must be cheap: the class decides
    which encoder layers are computed at all. Built-ins: ``keyword``, ``embedding`` (MiniLM),
    ``fixed``.

    Through a pipeline a router sees each prompt's *question*: the chat template, system
    prompt, harness instructions ("Answer the question using a single word or phrase."), hints
    and option lists are removed first (:func:`tokenprune.prompts.extract_question`; the router
    class sets ``reads_whole_prompt = True`` to get the whole text). ``explain(prompt)``, optional,
    returns the lines ``tokenprune route --explain`` prints.
    """


# ---------------------------------------------------------------------------------------------
# fusion
# ---------------------------------------------------------------------------------------------
@hookspec
def register_fusions(register: Callable[[str, type[Fusion]], None]) -> None:
    """Register layer-fusion stages: per-layer encoder features -> fused features in encoder and
    decoder space.

    :param register: call ``register(name, cls)``, ``cls`` a subclass of
        :class:`tokenprune.stages.Fusion`.

    A fusion stage implements two methods:

    - ``requirements(routing, table, num_layers) -> Requirements``: the hidden-state indices
      (``0..L``; ``0`` = patch embeddings) it will read for this batch, so that adapters ask the
      encoder for those layers only. A layer with zero weight for every row of the batch must not
      be listed.
    - ``fuse(tokens, routing, table) -> Fused``:

      - ``tokens``: :class:`tokenprune.contract.VisualTokens`; ``tokens.layer(l)`` is
        ``(B, M, Dv)``. ``tokens.project`` is the model's projector (``None`` = identity) and
        ``tokens.projected``, when given, already holds the decoder-space features of the fused
        mix (use it instead of calling ``project``).
      - ``routing``: the router's verdict; ``table``: the pipeline's
        :class:`tokenprune.classes.ClassTable`.
      - returns :class:`tokenprune.contract.Fused`: ``encoder`` ``(B, M, Dv)``, ``decoder``
        ``(B, M, D)`` (both in the input dtype), ``alpha`` ``(B, L)`` float32 or ``None``, and
        ``feed_llm``: whether the LLM should receive ``decoder`` for the kept tokens.

    Accumulate layers in place (``out.add_(h, alpha=w)``); never ``torch.stack`` the ``L``
    layers. Built-ins: ``class-adaptive`` (CLASP), ``single-layer``, ``mean``.
    """


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------
@hookspec
def register_scorers(register: Callable[[str, type[Scorer]], None]) -> None:
    """Register saliency scorers: tokens -> per-token score ``phi``.

    :param register: call ``register(name, cls)``, ``cls`` a subclass of
        :class:`tokenprune.stages.Scorer`.

    A scorer implements:

    - ``requirements(num_layers) -> Requirements`` (optional): the attention layers
      (``cls_attention`` / ``received_attention``) and whether the prompt's text embedding is
      needed. Adapters capture attention probabilities for exactly these layers and no others.
    - ``score(tokens, fused) -> Tensor``: ``(B, M)`` float32, higher = more salient. Read
      attention with ``tokens.signal("cls_attention", layer)`` (``(B, M)``, head-averaged); a
      missing signal raises an error that says how to supply it.

    Set the class variable ``permutation_invariant = False`` if the score depends on token
    order or positions. Built-ins: ``cls-attention``, ``received-attention``,
    ``text-similarity``, ``feature-norm``, ``random``.
    """


# ---------------------------------------------------------------------------------------------
# selection
# ---------------------------------------------------------------------------------------------
@hookspec
def register_selectors(register: Callable[[str, type[Selector]], None]) -> None:
    """Register pivot selectors: scores -> pivot set ``P`` under the budget ``K1``.

    :param register: call ``register(name, cls)``, ``cls`` a subclass of
        :class:`tokenprune.stages.Selector`.

    A selector implements ``select(scores, k1, valid, fused) -> Tensor``:

    - ``scores``: ``(B, M)`` float32; ``k1``: ``(B,)`` int64 with
      ``0 <= k1[b] <= valid[b].sum()``; ``valid``: ``(B, M)`` bool.
    - returns a ``(B, M)`` bool mask with exactly ``k1[b]`` true entries inside ``valid`` in row
      ``b``. Padding must never be chosen.

    Built-in: ``top-k`` (CLASP eq. 35, ties to the lower index).
    """


# ---------------------------------------------------------------------------------------------
# completion
# ---------------------------------------------------------------------------------------------
@hookspec
def register_completions(register: Callable[[str, type[Completion]], None]) -> None:
    """Register completion stages: fill the remaining ``K2`` under a redundancy/coverage rule.

    :param register: call ``register(name, cls)``, ``cls`` a subclass of
        :class:`tokenprune.stages.Completion`.

    A completion stage implements ``complete(request) -> CompletionResult``:

    - ``request``: :class:`tokenprune.stages.CompletionRequest` with ``unit`` ``(B, M, D)``
      unit decoder-space features, ``scores`` ``(B, M)`` float32, ``pivots`` ``(B, M)`` bool,
      ``k2`` ``(B,)`` int64, ``valid`` ``(B, M)`` bool, and the stage inputs. ``request.pool`` is
      ``valid & ~pivots``.
    - returns :class:`tokenprune.stages.CompletionResult`: ``mask`` ``(B, M)`` bool with exactly
      ``k2[b]`` entries of the pool in row ``b``, and optionally ``features`` ``(B, M, D)`` for
      merge-based methods (the LLM then receives them at the kept positions;
      :func:`tokenprune.merging.merged_features` projects encoder-space merges).

    Two optional methods:

    - ``requirements(num_layers) -> Requirements``: signals read from ``request.tokens``, e.g.
      ``Requirements(attention_keys={layer})`` for key-similarity merges; read them with
      ``request.tokens.key_features(layer)`` ``(B, M, Dk)``.
    - ``fixed_budget(tokens) -> Tensor | None``: ``(B,)`` counts when the stage itself decides
      how many tokens each row keeps (pooling); the pipeline then keeps exactly that many, and
      a call or spec with a different budget is an error.

    Built-ins: ``clasp`` (redundancy-aware seeding + spherical k-means medoids), ``none``
    (top-R by ``phi``), ``random``, ``grid``, ``divprune``, ``visionzip``, ``vispruner``, ``dpp``
    (CDPruner), ``dart``, ``prumerge+``, ``pool``.
    """


# ---------------------------------------------------------------------------------------------
# budget policy
# ---------------------------------------------------------------------------------------------
@hookspec
def register_budget_policies(register: Callable[[str, type[BudgetPolicy]], None]) -> None:
    """Register budget policies: class -> pivot ratio ``a``.

    :param register: call ``register(name, cls)``, ``cls`` a subclass of
        :class:`tokenprune.stages.BudgetPolicy`.

    A policy implements ``pivot_ratio(routing, table) -> Tensor``: ``(B,)`` float32 in
    ``[0, 1]``. The pipeline sets ``K1 = floor(a * R)`` and ``K2 = R - K1`` (CLASP eq. 34), with
    ``R`` the row's budget clipped to its valid token count. Built-ins: ``class-table`` (``a_c``
    from the class table), ``fixed``.
    """


# ---------------------------------------------------------------------------------------------
# in-LLM pruning
# ---------------------------------------------------------------------------------------------
@hookspec
def register_llm_pruners(register: Callable[[str, type[LlmPruner]], None]) -> None:
    """Register in-LLM pruners: drop visual tokens after decoder layer ``K - 1``, at prefill.

    :param register: call ``register(name, cls)``, ``cls`` a subclass of
        :class:`tokenprune.stages.LlmPruner`.

    A pruner implements:

    - ``schedule(num_layers) -> list[int]``: the layers ``K`` (ascending, ``1 <= K < num_layers``;
      the adapter rejects any other list with an error naming the stage) before which it drops
      tokens. Several layers make a schedule (PyramidDrop).
    - ``keep_counts(total, budget, steps)`` (optional): tokens per image after each step; the
      default is geometric and exact at the last step (= the call's budget).
    - ``select(request) -> Tensor``: :class:`tokenprune.stages.LlmRequest` holds, per image
      (row), the visual tokens' hidden states leaving layer ``K - 1`` ``(N, M, D)``, their
      validity, the count to keep, and what the class variable ``reads`` asked for: the text's
      attention to them at layer ``K - 1`` (``"attention"``; a ``query`` field picks the last
      token or the mean over question tokens) and the L2 norms of their keys
      (``"key_norms"``). Returns an ``(N, M)`` bool mask with exactly ``keep[n]`` entries.

    The adapter does everything else: it records only what ``reads`` asks for, only at the
    layers ``K - 1`` and only at prefill, while the layer's own kernel (SDPA, FlashAttention)
    runs unchanged; it drops the other tokens from the hidden states, keeps their original
    positions (1-D or M-RoPE) for the kept ones, and gives every later layer a mask and a KV
    cache without them. Earlier layers keep their full cache. Built-ins: ``fastv``,
    ``pyramid-drop``, ``dart``.
    """


# ---------------------------------------------------------------------------------------------
# model families
# ---------------------------------------------------------------------------------------------
@hookspec
def register_adapters(register: Callable[[str, type[Adapter]], None]) -> None:
    """Register model-family adapters: a transformers model class -> the adapter that prunes it.

    :param register: call ``register(model_class_name, cls)``, ``model_class_name`` the
        ``__name__`` of the model class (``"LlavaForConditionalGeneration"``) and ``cls`` a subclass
        of :class:`tokenprune.adapters.Adapter`.

    :func:`tokenprune.apply` walks the model's class hierarchy (its MRO) and takes the first class
    with a registered adapter, so an adapter registered for a subclass wins over its parent's.
    An adapter implements ``encode`` (the vision tower once, as
    :class:`tokenprune.adapters.Encoded`) and a few accessors (``image_token_id``,
    ``num_layers``, ``attention_module``, ``positions``, ``encoder_output``...); the per-call
    work (route, encode, budget, select, assemble) is :class:`tokenprune.call.PrunedCall`'s, the
    same for every family. ``docs/adapters.md`` walks through a whole family. The
    built-in families (LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, Qwen3-VL) are registered
    through this hook too.
    """


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
@hookspec
def register_commands(commands: Commands) -> None:
    """Add sub-commands to the ``tokenprune`` command line.

    :param commands: call ``commands.add_parser(name, help=...)`` for each command; it returns
        the command's own ``argparse.ArgumentParser``. Add its flags there and
        ``parser.set_defaults(func=run)``, ``run(args) -> int`` returning the exit status. Pass
        ``**tokenprune.cli.examples(("tokenprune NAME --flag x", "what it does"), ...)`` to
        ``add_parser`` to show examples under ``--help`` (the built-in commands all do, and a test
        parses each one). ``Ctrl-C`` ends ``run`` with one ``tokenprune: interrupted:`` line; raise
        ``KeyboardInterrupt("what was kept and how to resume")`` to say more than "nothing was kept".

    ``tokenprune --help`` lists every registered command; a name registered twice is an error
    naming both distributions. Import heavy modules inside ``run``, not at the top of the plugin
    module: every ``tokenprune`` invocation loads the plugins. The lab's commands (``eval``,
    ``bench``, ``demo``...) are registered through this hook (:mod:`tokenprune_lab.cli`).
    """
