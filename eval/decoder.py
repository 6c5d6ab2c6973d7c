"""The lossless speculative decoder (shared METHODS.md §1): chains and trees, greedy and sampled, batched.

    generations = speculative_generate(target, TokenDraft(drafter), prompts, DecodeSettings(gamma=4), stop_ids)

One step, for every row of the batch at once:
1. The drafter catches up on the tokens committed since its last step (one forward) and proposes: a chain of up to
   γ tokens (greedy, or sampled from its warped distribution q, which is kept), or a tree (top-k children per node,
   `tree=(k1, k2, ...)`, one drafter forward per depth with a tree attention mask).
2. The target scores the last committed token plus every proposal in one forward (a 4D mask makes tree nodes see
   only their ancestors) and gives p at every node.
3. Acceptance. Greedy: the longest path whose tokens are the target's argmax. Sampled chain: accept x_i when
   r_i q_i(x_i) <= p_i(x_i), r_i ~ U(0,1); on a rejection emit a token from the residual (p - q)_+, after a fully
   accepted chain a bonus token from p. Sampled tree (children are the drafter's top-k, a point mass each, the
   EAGLE-2 rule): at a node accept child x with probability p(x), else set p(x) = 0, renormalise and try the next
   sibling; if none is accepted emit a token from what is left of p. Temperature, top-k and top-p are applied to
   p and q identically (`models.sampling.warp_logits`), so the output follows the warped target distribution.
4. The accepted tokens and the target's own token are committed. Both KV caches are pre-allocated
   (`models.cache.RaggedKVCache`); rejected positions are forgotten by moving per-row pointers on the host, a tree's
   accepted path is copied into place. The step's results reach the host in one transfer (its one sync).

Adaptive draft length (`confidence_threshold` > 0, chains only): a row stops drafting after a token whose
drafter probability is below the threshold (the token itself is still proposed), as HF's assistant confidence
threshold and SpecDec++ do; deciding whether any row still drafts costs one host sync per drafted position.

Rows have their own lengths and acceptance; a finished row leaves the batch. Each row samples from its own
generator seeded from (seed, row key), so what a prompt gets does not depend on its batch.

Each kind of drafter drives its own forwards through the interface the decoder calls (`start`, `catch_up`,
`extend`, `commit`, `keep_rows`, `needs_features`): `models.drafter.TokenDraft` for standalone drafters,
`models.feature_drafter.FeatureDraft` for feature-level ones (EAGLE, FSPAD), which read the target's last hidden
states (the target forwards compute them already) and feed their own predicted features back while drafting;
each step they re-read the true features of what was accepted. `models.kinds.draft_for` picks the right one.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from transformers import PreTrainedModel

from eval.metrics import DecodeStats
from infra.settings import SettingsError, at_least, check_fields
from models.cache import RaggedKVCache, captured_layers, check_supported, forward_on_cache, head_logits, pad_rows
from models.kernels import few_row_linears
from models.lookup import child_of
from models.sampling import SamplingSettings, as_sampling, draw, make_generator, request_seed, warp_logits


@dataclass(frozen=True)
class DecodeSettings:
    gamma: int = 4  # chain draft length (the most a row drafts per step)
    tree: tuple[int, ...] = ()  # top-k branching per depth, e.g. (3, 2, 1); empty: a chain of gamma
    confidence_threshold: float = 0.0  # > 0: adaptive draft length (chains)
    sampling: SamplingSettings = field(default_factory=SamplingSettings)  # greedy by default
    max_new_tokens: int = 128
    batch_size: int = 1
    seed: int = 0
    LIMITS: ClassVar[dict] = {"gamma": at_least(1), "max_new_tokens": at_least(1), "batch_size": at_least(1)}

    def __post_init__(self) -> None:
        object.__setattr__(self, "tree", tuple(int(k) for k in self.tree))
        object.__setattr__(self, "sampling", as_sampling(self.sampling))
        check_fields(self)
        if any(k < 1 for k in self.tree):
            raise SettingsError(f"tree={list(self.tree)}: every depth needs at least one child per node", "tree")
        if not 0 <= self.confidence_threshold < 1:
            raise SettingsError(f"confidence_threshold={self.confidence_threshold}: must be in [0, 1)",
                                "confidence_threshold")
        if self.tree and self.confidence_threshold:
            raise SettingsError(f"confidence_threshold={self.confidence_threshold}: adaptive draft length applies "
                                f"to chains; use tree=[] with it", "confidence_threshold")

    @property
    def depth(self) -> int:
        return len(self.tree) or self.gamma

    @property
    def block_width(self) -> int:
        """Tokens in one verification forward: the last committed token and the drafts (chain or tree)."""
        return Tree(self.tree).size if self.tree else self.gamma + 1


def as_decode(value: DecodeSettings | dict) -> DecodeSettings:
    """`DecodeSettings` from itself or from a mapping (a report's recorded settings, a test's dict)."""
    return value if isinstance(value, DecodeSettings) else DecodeSettings(**value)


@dataclass
class Generation:
    tokens: list[int]
    stats: DecodeStats
    finished_by_stop: bool = False


class Tree:
    """Node 0 is the last committed token; nodes are numbered depth by depth, children of one parent adjacent."""

    def __init__(self, branching: tuple[int, ...]) -> None:
        self.branching = branching
        self.parent, self.depth, self.levels = [-1], [0], [[0]]
        for k in branching:
            level = []
            for parent in self.levels[-1]:
                for _ in range(k):
                    level.append(len(self.parent))
                    self.parent.append(parent)
                    self.depth.append(self.depth[parent] + 1)
            self.levels.append(level)
        size = len(self.parent)
        self.ancestors = torch.zeros(size, size, dtype=torch.bool)  # [i, j]: j is i or one of its ancestors
        for node in range(size):
            walk = node
            while walk >= 0:
                self.ancestors[node, walk] = True
                walk = self.parent[walk]
        self.children = [torch.tensor(level).view(len(previous), -1)
                         for previous, level in zip(self.levels, self.levels[1:])]  # per depth: [parents, k]

    @property
    def size(self) -> int:
        return len(self.parent)


class _Rows:
    """Per-row random streams: draws for sampling (`models.sampling.draw`), uniforms for acceptance tests."""

    def __init__(self, seeds: list[int], device: torch.device) -> None:
        self.generators = [make_generator(seed, device) for seed in seeds]
        self.device = device

    def keep_rows(self, rows: list[int]) -> None:
        self.generators = [self.generators[row] for row in rows]

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """One token per row of [rows, V] non-negative weights (normalisation not needed)."""
        return draw(probs, self.generators)

    def uniform(self, count: int) -> torch.Tensor:
        return torch.stack([torch.rand(count, device=self.device, generator=g) for g in self.generators])


class _Target:
    """The target's pre-allocated cache (holding every committed token but the last) and, for feature drafters,
    its last hidden states per committed position."""

    def __init__(self, model: PreTrainedModel, prompts: list[list[int]], capacity: int, keep_features: bool,
                 feature_layers: tuple[int, ...] | None = None) -> None:
        check_supported(model)
        self.model, self.feature_layers = model, feature_layers if keep_features else None
        self.cache = RaggedKVCache.for_model(model, len(prompts), capacity)
        self.features = self.layer_features = None
        self.lengths = [0] * len(prompts)
        tokens = pad_rows([prompt[:-1] for prompt in prompts], self.cache.device)
        self.forward(tokens, torch.ones(tokens.shape[1], tokens.shape[1]).tril().bool(), torch.arange(tokens.shape[1]))
        if keep_features:
            kept = self.layer_features
            self.features = kept.new_zeros(len(prompts), capacity, kept.shape[-1])
            self.features[:, : kept.shape[1]] = kept
        self.lengths = [len(prompt) - 1 for prompt in prompts]

    def forward(self, tokens: torch.Tensor, local: torch.Tensor, relative: torch.Tensor) -> torch.Tensor:
        """The last hidden states of the block; the features a feature drafter reads (those, or the outputs of its
        `feature_layers`, concatenated) wait in `layer_features` for `store_features`."""
        with captured_layers(self.model, self.feature_layers) as captured:
            hidden = forward_on_cache(self.model, self.cache, tokens, self.lengths, local, relative)
        self.layer_features = hidden if captured[0] is None else captured[0]
        return hidden

    def store_features(self, hidden: torch.Tensor, nodes: torch.Tensor) -> None:
        """Keep the features of `nodes` [rows, n] (block indices) of the last forward at columns lengths[b] + 0..n-1."""
        if self.features is not None:
            kept = self.layer_features
            rows = torch.arange(kept.shape[0], device=kept.device)[:, None]
            columns = torch.tensor(self.lengths, device=kept.device)[:, None] + torch.arange(
                nodes.shape[1], device=kept.device)
            self.features[rows, columns] = kept[rows, nodes]

    def keep_rows(self, rows: list[int]) -> None:
        self.cache.keep_rows(rows)
        self.lengths = [self.lengths[row] for row in rows]
        if self.features is not None:
            self.features = self.features[torch.tensor(rows, device=self.features.device)]


def accepts(draws: torch.Tensor, p_token: torch.Tensor, q_token: torch.Tensor) -> torch.Tensor:
    """Leviathan's test, r <= p(x)/q(x), written without the division (q(x) > 0 for a drafted x)."""
    return draws * q_token <= p_token


def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Weights of the token emitted at the first rejection: (p - q)_+ (all of p past the last draft, where q = 0).
    A zero residual means p == q, where nothing is rejected; p is returned so the rows stay well defined."""
    left = (p - q).clamp_min(0)
    return torch.where(left.sum(-1, keepdim=True) > 0, left, p)


def _chain_step(target: _Target, draft, sequences: list[list[int]], budgets: list[int],
                settings: DecodeSettings, rng: _Rows, recorder=None) -> tuple[list[tuple[int, int, list[int]]], int]:
    """One chain step; per row (proposed, accepted, emitted tokens), and how many drafts were fed to the drafter.
    A `recorder` (`VerificationRecorder`) gets what the verification computed: the block and the target's logits."""
    device = target.cache.device
    rows = len(sequences)
    drafts, q_rows, proposed = _draft_chain(draft, sequences, budgets, settings, rng, target.features)
    count = len(drafts)
    last = torch.tensor([sequence[-1] for sequence in sequences], device=device)[:, None]
    block = torch.cat([last] + [token[:, None] for token in drafts], 1)
    hidden = target.forward(block, torch.ones(count + 1, count + 1).tril().bool(), torch.arange(count + 1))
    logits = head_logits(target.model, hidden)
    if draft.observes:  # a drafter that learns from the target's scores (Token Recycling)
        draft.observe(block, logits)
    accepted, own = _accept_chain(logits, block, q_rows, proposed, settings, rng)
    if recorder is not None:
        recorder.verified(block, logits, proposed)
    target.store_features(hidden, torch.arange(count + 1, device=device).expand(rows, -1))
    packed = torch.cat([proposed[:, None], accepted[:, None], block[:, 1:], own[:, None]], 1).tolist()  # the sync
    results = [(row[0], row[1], row[2: 2 + row[1]] + [row[-1]]) for row in packed]
    return results, max(0, count - 1)


def _draft_chain(draft, sequences: list[list[int]], budgets: list[int], settings: DecodeSettings, rng: _Rows,
                 features: torch.Tensor | None) -> tuple[list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """The drafter's chain: per drafted position the tokens [rows], (sampled) the distributions q they were drawn
    from [rows, V], and how many of them each row proposes [rows] (its budget, or fewer where it stopped)."""
    rows, most = len(sequences), max(budgets)
    sampling = not settings.sampling.greedy
    drafts, q_rows = [], []
    device = rng.device
    proposed = torch.zeros(rows, dtype=torch.long, device=device)
    if not most:
        return drafts, q_rows, proposed
    logits = draft.catch_up(sequences, features)
    alive = torch.ones(rows, dtype=torch.bool, device=device)
    budget = torch.tensor(budgets, device=device)
    abstains = draft.abstains
    for i in range(most):
        if abstains:  # a drafter without a guess (all -inf) stops drafting that row: nothing to verify
            alive &= torch.isfinite(logits.max(-1).values)
            if not bool(alive.any()):
                break
            logits = torch.where(alive[:, None], logits, 0.0)  # finite for rows that stopped (never used)
        if sampling:
            q = torch.softmax(warp_logits(logits, settings.sampling), -1)
            token = rng.sample(q)
            q_rows.append(q)
        else:
            token = logits.argmax(-1)
        drafts.append(token)
        proposed += (alive & (budget > i)).long()
        if settings.confidence_threshold:
            probs = q if sampling else torch.softmax(logits, -1)
            alive &= probs.gather(1, token[:, None])[:, 0] >= settings.confidence_threshold
            if not bool(alive.any()):  # adaptive length: one sync per drafted position
                break
        if i + 1 < most:
            logits = draft.extend(token[:, None], [0], torch.ones(1, i + 1, dtype=torch.bool),
                                  torch.tensor([i]), i)[:, 0]
    return drafts, q_rows, proposed


def _accept_chain(logits: torch.Tensor, block: torch.Tensor, q_rows: list[torch.Tensor], proposed: torch.Tensor,
                  settings: DecodeSettings, rng: _Rows) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of a verified chain (`block` [rows, count + 1]: the last committed token and the drafts), how many
    drafts are accepted and the target's own token after them (greedy: its argmax; sampled: Leviathan's rule)."""
    rows, count = block.shape[0], block.shape[1] - 1
    valid = torch.arange(count, device=block.device)[None, :] < proposed[:, None]
    if settings.sampling.greedy:
        choice = logits.argmax(-1)
        accepted = ((block[:, 1:] == choice[:, :count]) & valid).long().cumprod(1).sum(1)
        return accepted, choice.gather(1, accepted[:, None])[:, 0]
    p = torch.softmax(warp_logits(logits, settings.sampling), -1)
    q = torch.stack(q_rows, 1) if q_rows else p.new_zeros(rows, 0, p.shape[-1])
    q = torch.cat([q * valid[..., None], p.new_zeros(rows, 1, p.shape[-1])], 1)  # q = 0 where not drafted
    x = block[:, 1:]
    ok = accepts(rng.uniform(count), p[:, :count].gather(2, x[..., None])[..., 0],
                 q[:, :count].gather(2, x[..., None])[..., 0]) & valid
    accepted = ok.long().cumprod(1).sum(1)
    at = accepted[:, None, None].expand(-1, 1, p.shape[-1])
    return accepted, rng.sample(residual(p.gather(1, at)[:, 0], q.gather(1, at)[:, 0]))


def _children(tree: Tree, depth: int, current: torch.Tensor) -> torch.Tensor:
    """[rows, k] node ids of the children of each row's current node (rows that stopped earlier get any
    valid row; their result is masked)."""
    table = tree.children[depth].to(current.device)
    return table[(current - tree.levels[depth][0]).clamp(0, table.shape[0] - 1)]


def _draft_tree(draft, tree: Tree, sequences: list[list[int]], features: torch.Tensor | None) -> list[torch.Tensor]:
    """The drafter's top-k tree: per depth d, the tokens of its nodes [rows, nodes at depth d] (node order as in
    `Tree`); one drafter forward per depth after the catch-up."""
    depth = len(tree.branching)
    logits = draft.catch_up(sequences, features)[:, None]  # [rows, 1, V]: the root's children
    levels = []
    for d, k in enumerate(tree.branching, start=1):
        levels.append(logits.topk(k, dim=-1).indices.flatten(1))  # [rows, nodes at depth d]
        if d < depth:
            logits = _extend_level(draft, tree, d, levels[-1])
    return levels


def _extend_level(draft, tree: Tree, d: int, tokens: torch.Tensor) -> torch.Tensor:
    """The drafter's logits after the nodes at depth d [rows, nodes at depth d], each seeing its ancestors."""
    nodes = tree.levels[d]
    local = tree.ancestors[nodes][:, 1: nodes[-1] + 1]
    parents = [tree.parent[n] - (tree.levels[d - 1][0] if d > 1 else 0) for n in nodes]
    return draft.extend(tokens, parents, local, torch.tensor([d - 1] * len(nodes)), nodes[0] - 1)


def _tree_step(target: _Target, draft, tree: Tree, sequences: list[list[int]], settings: DecodeSettings,
               rng: _Rows) -> tuple[list[tuple[int, int, list[int]]], torch.Tensor]:
    """One tree step; per row (depth, accepted, emitted tokens), and the accepted path's nodes [rows, depth]."""
    device = target.cache.device
    rows, depth = len(sequences), len(tree.branching)
    levels = _draft_tree(draft, tree, sequences, target.features)
    last = torch.tensor([sequence[-1] for sequence in sequences], device=device)[:, None]
    block = torch.cat([last] + levels, 1)  # [rows, tree.size]
    hidden = target.forward(block, tree.ancestors, torch.tensor(tree.depth))
    logits = head_logits(target.model, hidden)
    if draft.observes:
        draft.observe(block, logits)
    path, accepted, own = _accept_tree(logits, block, tree, settings, rng)
    nodes = torch.cat([torch.zeros(rows, 1, dtype=torch.long, device=device), path], 1)
    target.store_features(hidden, nodes)
    packed = torch.cat([accepted[:, None], block.gather(1, path), own[:, None]], 1).tolist()  # the sync
    results = [(depth, row[0], row[1: 1 + row[0]] + [row[-1]]) for row in packed]
    return results, path


def _accept_tree(logits: torch.Tensor, block: torch.Tensor, tree: Tree, settings: DecodeSettings,
                 rng: _Rows) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of a verified top-k tree (`block` [rows, tree.size]): the accepted path's nodes [rows, depth]
    (repeating the last accepted node past it), how many are accepted, and the target's own token after them."""
    device = block.device
    rows, depth = block.shape[0], len(tree.branching)
    every = torch.arange(rows, device=device)
    current = torch.zeros(rows, dtype=torch.long, device=device)
    searching = torch.ones(rows, dtype=torch.bool, device=device)
    path = torch.zeros(rows, depth, dtype=torch.long, device=device)
    accepted = torch.zeros(rows, dtype=torch.long, device=device)
    if settings.sampling.greedy:
        choice = logits.argmax(-1)
        for d in range(depth):
            children = _children(tree, d, current)  # [rows, k]
            hit = (block.gather(1, children) == choice.gather(1, current[:, None])) & searching[:, None]
            found = hit.any(1)
            current = torch.where(found, children.gather(1, hit.long().argmax(1, keepdim=True))[:, 0], current)
            path[:, d] = current
            accepted += found.long()
            searching &= found
        own = choice.gather(1, current[:, None])[:, 0]
    else:
        p = torch.softmax(warp_logits(logits, settings.sampling), -1)
        final = p[:, 0].clone()
        for d in range(depth):
            children = _children(tree, d, current)
            left = p[every, current].clone()  # what is left of p at this node
            chosen = torch.full_like(current, -1)
            draws = rng.uniform(children.shape[1])
            for j in range(children.shape[1]):
                token = block.gather(1, children[:, j: j + 1])[:, 0]
                mass = left.sum(-1)
                share = left.gather(1, token[:, None])[:, 0] / mass.clamp_min(1e-30)
                take = searching & (chosen < 0) & (draws[:, j] < share)
                chosen = torch.where(take, children[:, j], chosen)
                reject = searching & (chosen < 0)
                left = left.scatter(1, token[:, None], torch.where(reject[:, None], 0.0,
                                                                   left.gather(1, token[:, None])))
            failed = searching & (chosen < 0)
            final = torch.where(failed[:, None], left, final)
            searching &= ~failed
            current = torch.where(searching, chosen, current)
            path[:, d] = current
            accepted += searching.long()
        final = torch.where(searching[:, None], p[every, current], final)
        own = rng.sample(final)
    return path, accepted, own


def merge_proposals(drafted: list[tuple[list[int], list[int]]] | None, chains: list[list[int]]):
    """Per row, one token tree (tokens, parents; node 0 is the last committed token, node i > 0 holds tokens[i-1]
    below node parents[i-1] < i) from the drafter's own tree per row (`drafted`, in the same form; None: it did not
    run) and the lookup's continuation `chains`: the lookup's tokens follow the drafter's nodes while they agree
    (one node for both) and hang below as a chain from the first disagreement."""
    merged = []
    for row, chain in enumerate(chains):
        tokens, parents = (list(drafted[row][0]), list(drafted[row][1])) if drafted is not None else ([], [])
        node = 0
        for token in chain:
            child = child_of(tokens, parents, node, token)
            if child is None:
                tokens.append(token)
                parents.append(node)
                child = len(tokens)
            node = child
        merged.append((tokens, parents))
    return merged


def draft_pruned(draft, tree: Tree, sequences: list[list[int]], features: torch.Tensor | None,
                 min_probability: float) -> list[tuple[list[int], list[int]]]:
    """The drafter's top-k `tree` per row (tokens, parents as in `merge_proposals`), keeping only the nodes whose
    path probability under the drafter (the product of its probabilities along the path) is at least
    `min_probability`, and running no further depth once no row keeps a node (EAGLE-2's confidence, used as the
    node's chance of acceptance: a node is worth verifying when that chance exceeds what one more token of
    verification costs, in plain steps). 0 keeps the whole tree."""
    rows, depth = len(sequences), len(tree.branching)
    logits = draft.catch_up(sequences, features)[:, None]
    path = torch.ones(rows, 1, device=logits.device)  # path probability of the current level's nodes
    kept = [{0: 0} for _ in range(rows)]  # per row: tree node -> its number in the row's proposal (0: the root)
    proposals: list[tuple[list[int], list[int]]] = [([], []) for _ in range(rows)]
    for d, k in enumerate(tree.branching, start=1):
        probabilities, tokens = torch.softmax(logits.float(), -1).topk(k, dim=-1)  # [rows, parents, k]
        path = (path[..., None] * probabilities).flatten(1)  # [rows, nodes at depth d]
        tokens = tokens.flatten(1)
        nodes = tree.levels[d]
        alive = False
        for row, (row_tokens, row_paths) in enumerate(zip(tokens.tolist(), path.tolist())):
            for node, token, probability in zip(nodes, row_tokens, row_paths):
                parent = tree.parent[node]
                if parent in kept[row] and probability >= min_probability:
                    proposals[row][0].append(token)
                    proposals[row][1].append(kept[row][parent])
                    kept[row][node] = len(proposals[row][0])
                    alive = True
        if d == depth or not alive:
            break
        logits = _extend_level(draft, tree, d, tokens)
    return proposals


def without(left: torch.Tensor, token: int) -> None:
    """A rejected child's token takes no further part at its node: its mass leaves what is left of p."""
    left[token] = 0.0


def _accept_general(logits: torch.Tensor, block: list[list[int]], parents: list[list[int]],
                    depths: list[list[int]], settings: DecodeSettings, rng: _Rows) -> list[tuple[list[int], int]]:
    """Per row of a verified general tree (block[b][i] the token at node i, parents[b][i-1] its parent, padded
    nodes having parent -1; depths[b][i] its depth): (the accepted path's nodes, the target's own token). Greedy: the deepest node whose
    every token is the target's argmax after its parent. Sampled: at each node its children in order, each
    accepted with the probability of its token under what is left of p (else that token's mass is removed), the
    rule of `_tree_step` for point-mass drafts, on a tree of any shape; duplicate tokens cannot be accepted twice."""
    results = []
    if settings.sampling.greedy:
        choice = logits.argmax(-1).tolist()
        for tokens, row_parents, depth, row_choice in zip(block, parents, depths, choice):
            ok, best = [True], 0
            for node, parent in enumerate(row_parents, start=1):
                good = parent >= 0 and ok[parent] and tokens[node] == row_choice[parent]
                ok.append(good)
                if good and depth[node] > depth[best]:
                    best = node
            path = []
            walk = best
            while walk > 0:
                path.append(walk)
                walk = row_parents[walk - 1]
            results.append((path[::-1], row_choice[best]))
        return results
    p = torch.softmax(warp_logits(logits, settings.sampling), -1)
    for row, (tokens, row_parents) in enumerate(zip(block, parents)):
        generator = rng.generators[row]
        children: dict[int, list[int]] = {}
        for node, parent in enumerate(row_parents, start=1):
            if parent >= 0:
                children.setdefault(parent, []).append(node)
        current, path = 0, []
        while True:
            left = p[row, current].clone()
            chosen = None
            for child in children.get(current, []):
                token = tokens[child]
                share = left[token] / left.sum().clamp_min(1e-30)
                if float(torch.rand(1, device=left.device, generator=generator)) < float(share):
                    chosen = child
                    break
                without(left, token)
            if chosen is None:
                own = int(draw(left[None], [generator])[0])
                break
            current = chosen
            path.append(current)
        results.append((path, own))
    return results


def _merged_block(proposals: list[tuple[list[int], list[int]]], sequences: list[list[int]]):
    """The verification block of merged trees (`merge_proposals`), padded to the widest row: per row its tokens
    (the last committed token first), its nodes' parents (-1 for padding), their depths, and the ancestor mask
    [rows, w, w] (a node sees its ancestors; a padded one itself and the root)."""
    width = 1 + max(len(tokens) for tokens, _ in proposals)
    block, parents, depths = [], [], []
    local = torch.zeros(len(proposals), width, width, dtype=torch.bool)
    for row, (tokens, row_parents) in enumerate(proposals):
        padding = width - 1 - len(tokens)
        block.append([sequences[row][-1]] + tokens + [0] * padding)
        parents.append(row_parents + [-1] * padding)
        depth = [0]
        for node in range(width):
            if node:
                parent = parents[row][node - 1]
                depth.append(depth[parent] + 1 if parent >= 0 else 1)
            walk = node
            while True:  # a node sees its ancestors; a padded one (parent -1) itself and the root
                local[row, node, walk] = True
                if walk == 0:
                    break
                walk = max(parents[row][walk - 1], 0)
        depths.append(depth)
    return block, parents, depths, local


def _merged_step(target: _Target, merged, tree: Tree, sequences: list[list[int]], settings: DecodeSettings,
                 rng: _Rows):
    """One merged-tree step (`models.lookup.MergedDraft`): the lookup's continuation and the trained drafter's own
    tree (`tree`; skipped where the lookup's guess is long enough) merged into one token tree per row
    (`merge_proposals`), verified in one forward with each row's own ancestor mask and positions. Returns per row
    (deepest drafted position, accepted, emitted tokens), the accepted path's nodes [rows, depth] (padded by
    repeating its last node), the block's width, and whether the drafter ran."""
    device = target.cache.device
    chains = merged.lookup_chains(sequences)
    ran = merged.drafter_needed(chains)
    started = time.perf_counter()
    drafted = draft_pruned(merged.trained, tree, sequences, target.features, merged.min_probability) if ran else None
    drafted_at = time.perf_counter()
    proposals = merge_proposals(drafted, chains)
    block, parents, depths, local = _merged_block(proposals, sequences)
    width = len(block[0])
    block_tensor = torch.tensor(block, device=device)
    verify_at = time.perf_counter()
    hidden = target.forward(block_tensor, local, torch.tensor(depths))
    logits = head_logits(target.model, hidden)
    if merged.observes:
        merged.observe(block_tensor, logits)
    accepted = _accept_general(logits, block, parents, depths, settings, rng)
    if merged.gate is not None:  # eval.merged_skip_at=auto: what the drafter brought this step, and what it cost
        merged.gate.record(chains, proposals, [path for path, _ in accepted], ran, drafted_at - started,
                           time.perf_counter() - verify_at)
    most = max(1, max(len(path) for path, _ in accepted))
    nodes = torch.tensor([[0] + path + [path[-1] if path else 0] * (most - len(path)) for path, _ in accepted],
                         device=device)
    target.store_features(hidden, nodes)
    results = [(max(depths[row]), len(path), [block[row][n] for n in path] + [own])
               for row, (path, own) in enumerate(accepted)]
    return results, nodes[:, 1:], width, ran


def _capacity(prompts: list[list[int]], settings: DecodeSettings, tree: Tree | None, extra: int = 0) -> int:
    return max(map(len, prompts)) + settings.max_new_tokens + (tree.size if tree else settings.gamma) + extra + 2


class _TimedDraft:
    """Times a drafter's drafting forwards (not its catch-up), synchronising the device around each: for
    measuring the cost ratio c only, never in timed runs."""

    def __init__(self, draft, timings: dict) -> None:
        self.draft, self.timings = draft, timings
        timings.setdefault("draft_seconds", 0.0)
        timings.setdefault("draft_forwards", 0)

    def __getattr__(self, name):
        return getattr(self.draft, name)

    def extend(self, *arguments):
        device = self.draft.device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        logits = self.draft.extend(*arguments)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.timings["draft_seconds"] += time.perf_counter() - started
        self.timings["draft_forwards"] += 1
        return logits


class VerificationRecorder:
    """What verification computed, kept for learning from it (the `online` stage): per prompt and chain step, the
    step's first generated position, the tokens the drafter proposed, and the target's top-k log-probabilities
    at every block position: position j scores the token after the last
    committed token and the first j drafts. Costs one top-k and one host transfer per step; nothing is recomputed.

    `steps[prompt]` lists dicts {start, drafts, topk_ids, topk_logprobs}; the accepted count follows
    from the generation (a draft is accepted where it equals the generated token at its position)."""

    def __init__(self, prompts: int, top_k: int) -> None:
        self.top_k, self.steps = top_k, [[] for _ in range(prompts)]
        self.live: list[int] = []
        self.starts: list[int] = []

    def begin(self, live: list[int], starts: list[int]) -> None:
        self.live, self.starts = list(live), list(starts)

    def verified(self, block: torch.Tensor, logits: torch.Tensor, proposed: torch.Tensor) -> None:
        log_probs = torch.log_softmax(logits.float(), -1)
        values, ids = log_probs.topk(min(self.top_k, log_probs.shape[-1]), -1)
        for row, (count, drafts, top_ids, top_values) in enumerate(zip(
                proposed.tolist(), block[:, 1:].tolist(), ids.tolist(), values.tolist())):
            self.steps[self.live[row]].append({
                "start": self.starts[row], "drafts": drafts[:count], "topk_ids": top_ids[: count + 1],
                "topk_logprobs": top_values[: count + 1]})


@torch.inference_mode()
def speculative_generate(target: PreTrainedModel, draft, prompts: list[list[int]], settings: DecodeSettings,
                         stop_ids: list[int], keys: list[str] | None = None,
                         timings: dict | None = None, recorder: VerificationRecorder | None = None) -> list[Generation]:
    """Speculative generations for `prompts` (token id lists), `settings.batch_size` rows at a time. `keys` name
    the rows' random streams (default: their index); `draft` is a `TokenDraft` or a `FeatureDraft`. With
    `timings`, the drafter's drafting forwards are timed into it (adds syncs: for measuring c only); a `recorder`
    (chains only) keeps what each verification computed."""
    keys = keys or [str(i) for i in range(len(prompts))]
    if recorder is not None and settings.tree:
        raise ValueError("recording verifications is implemented for chains (tree=[]), not trees")
    if timings is not None:
        draft = _TimedDraft(draft, timings)
    generations = []
    with few_row_linears(target, *draft.networks):
        for first in range(0, len(prompts), settings.batch_size):
            chunk = slice(first, first + settings.batch_size)
            generations += _generate_batch(target, draft, prompts[chunk], settings, stop_ids, keys[chunk],
                                           _Offset(recorder, first) if recorder is not None else None)
    return generations


class _Offset:
    """A recorder seen by one batch: batch row indices shifted to prompt indices."""

    def __init__(self, recorder: VerificationRecorder, first: int) -> None:
        self.recorder, self.first = recorder, first

    def begin(self, live: list[int], starts: list[int]) -> None:
        self.recorder.begin([self.first + row for row in live], starts)

    def verified(self, *arguments) -> None:
        self.recorder.verified(*arguments)


def _generate_batch(target_model, draft, prompts, settings, stop_ids, keys, recorder=None) -> list[Generation]:
    merged = draft.merged  # models.lookup.MergedDraft: a lookup's and a drafter's tree in one
    tree = Tree(settings.tree) if settings.tree else None
    if merged:  # the drafter's own part of the merged tree
        tree = Tree(draft.drafter_branching(settings.tree, settings.gamma))
    extra = draft.depth if merged else 0
    capacity = _capacity(prompts, settings, tree, extra)
    target = _Target(target_model, prompts, capacity, draft.needs_features, draft.feature_layers)
    draft.start(len(prompts), capacity)
    rng = _Rows([request_seed(settings.seed, key) for key in keys], target.cache.device)
    depth = max(len(tree.branching), draft.depth) if merged else settings.depth
    results = [Generation([], DecodeStats(depth=depth)) for _ in prompts]
    live = list(range(len(prompts)))  # batch row -> prompt index
    sequences = [list(prompt) for prompt in prompts]
    stops = set(stop_ids)
    while live:
        remaining = [settings.max_new_tokens - len(results[i].tokens) for i in live]
        ran = True
        if merged:
            steps, path, width, ran = _merged_step(target, draft, tree, sequences, settings, rng)
            fed = 0
        elif tree:
            steps, path = _tree_step(target, draft, tree, sequences, settings, rng)
            fed, width = 0, tree.size
        else:
            if recorder is not None:
                recorder.begin(live, [len(results[i].tokens) for i in live])
            steps, fed = _chain_step(target, draft, sequences, [min(settings.gamma, r - 1) for r in remaining],
                                     settings, rng, recorder)
            width = max(proposed for proposed, _, _ in steps) + 1
        accepted = [n for _, n, _ in steps]
        if tree:  # move the accepted path's keys/values next to the prefix
            columns = torch.tensor(target.lengths, device=path.device)[:, None]
            target.cache.move(columns + path, columns + torch.arange(1, path.shape[1] + 1, device=path.device))
        draft.commit(accepted, fed)
        target.lengths = [length + n + 1 for length, n in zip(target.lengths, accepted)]
        keep = []
        for row, ((proposed, n, emitted), left) in enumerate(zip(steps, remaining)):
            result = results[live[row]]
            cut = next((i + 1 for i, token in enumerate(emitted) if token in stops), len(emitted))
            emitted = emitted[: min(cut, left)]
            result.tokens += emitted
            sequences[row] += emitted
            result.stats.record_step(proposed, min(n, len(emitted)), len(emitted), width, ran)
            result.finished_by_stop = emitted[-1] in stops
            if not result.finished_by_stop and len(result.tokens) < settings.max_new_tokens:
                keep.append(row)
        if len(keep) < len(live):
            if keep:
                for part in (target, draft, rng):
                    part.keep_rows(keep)
            live, sequences = [live[row] for row in keep], [sequences[row] for row in keep]
    return results


@torch.inference_mode()
def plain_generate(target_model: PreTrainedModel, prompts: list[list[int]], settings: DecodeSettings,
                   stop_ids: list[int], keys: list[str] | None = None) -> list[list[int]]:
    """Plain decoding, one token per forward, on the same cache, forward and sampling as the speculative path."""
    return _plain_batches(target_model, prompts, settings, stop_ids, keys, top_k=0)[0]


def plain_generate_topk(target_model: PreTrainedModel, prompts: list[list[int]], settings: DecodeSettings,
                        stop_ids: list[int], keys: list[str] | None, top_k: int):
    """`plain_generate`, and per request and emitted token the target's top-k (ids, log-probabilities) of the
    distribution the token was chosen from: what decoding computed anyway, so no second pass over the answers."""
    return _plain_batches(target_model, prompts, settings, stop_ids, keys, top_k)


def _plain_batches(target_model, prompts, settings, stop_ids, keys, top_k: int):
    keys = keys or [str(i) for i in range(len(prompts))]
    outputs, top_ids, top_values = [], [], []
    with few_row_linears(target_model):
        for first in range(0, len(prompts), settings.batch_size):
            chunk = prompts[first: first + settings.batch_size]
            target = _Target(target_model, chunk, _capacity(chunk, settings, None), keep_features=False)
            rng = _Rows([request_seed(settings.seed, key) for key in keys[first: first + settings.batch_size]],
                        target.cache.device)
            tokens, ids, values = [[] for _ in chunk], [[] for _ in chunk], [[] for _ in chunk]
            live, last = list(range(len(chunk))), [prompt[-1] for prompt in chunk]
            one = torch.ones(1, 1, dtype=torch.bool)
            while live:
                block = torch.tensor(last, device=target.cache.device)[:, None]
                logits = head_logits(target_model, target.forward(block, one, torch.zeros(1, dtype=torch.long)))[:, 0]
                if settings.sampling.greedy:
                    chosen = logits.argmax(-1)
                else:
                    chosen = rng.sample(torch.softmax(warp_logits(logits, settings.sampling), -1))
                if top_k:
                    top = torch.log_softmax(logits.float(), -1).topk(top_k, -1)
                    for row, (i, v) in enumerate(zip(top.indices.tolist(), top.values.tolist())):
                        ids[live[row]].append(i)
                        values[live[row]].append(v)
                target.lengths = [length + 1 for length in target.lengths]
                keep = []
                for row, token in enumerate(chosen.tolist()):  # the step's one sync
                    tokens[live[row]].append(token)
                    last[row] = token
                    if token not in stop_ids and len(tokens[live[row]]) < settings.max_new_tokens:
                        keep.append(row)
                if len(keep) < len(live) and keep:
                    target.keep_rows(keep)
                    rng.keep_rows(keep)
                live, last = [live[row] for row in keep], [last[row] for row in keep]
            outputs += tokens
            top_ids += ids
            top_values += values
    return outputs, top_ids, top_values


@torch.inference_mode()
def verification_seconds(target_model: PreTrainedModel, prompt_ids: list[int], widths: list[int],
                         calls: int = 5) -> dict[int, float]:
    """Median seconds per target forward over a w-token block after `prompt_ids` (LM head and the host transfer
    included), for each w in `widths`, on this cache and forward; the widths alternate, after one warm-up round."""
    target = _Target(target_model, [prompt_ids], len(prompt_ids) + max(widths), keep_features=False)
    times: dict[int, list[float]] = {w: [] for w in widths}
    with few_row_linears(target_model):
        for _ in range(calls + 1):
            for w in times:  # lengths are not advanced: every call writes the same cache columns
                tokens = torch.full((1, w), prompt_ids[-1], device=target.cache.device)
                started = time.perf_counter()
                head_logits(target_model, target.forward(tokens, torch.ones(w, w).tril().bool(), torch.arange(w))
                            ).argmax(-1).tolist()
                times[w].append(time.perf_counter() - started)
    return {w: statistics.median(t[1:]) for w, t in times.items()}


class LosslessnessError(AssertionError):
    pass
