"""A cheap certificate that the moments held along an MD trajectory are still the lowest.

Most MD steps do not change the spin ground state, and a search at every step pays for proving
it again. The certificate proves it from what the MD step computes anyway: the energy and the
spin forces -dE/dS at the current moments S0.

The competitors of S0 are every single-ion move to another allowed level, every two-ion move
(when there are at most pair_limit of them: 135 for 6 ions of 4 levels, 252 for 8; else every
exchange of two ions' moments, when there are at most exchange_limit of them: at most 351 for 27
ions) and the lowest configurations of the last search. An exchange swaps the
moments of two ions with the same allowed values and so keeps the total moment; on a trained LiNiO2
model with 27 Ni, descents over exchanges from the moments MD held went 10-203 meV per cell lower at
every sampled step (docs/benchmarks/spin_md.md, "Exchanges"). Each competitor is evaluated exactly at
some geometry, its reference: its gap G_c = E(c) - E(S0) there and the spin forces g at S0 there. At
a later geometry its gap is predicted from the change of the spin forces since, g' - g:

    G_c' = G_c - (g' - g) . (c - S0)

exact for single-ion moves in a landscape E = sum_i f_i(S_i) + sum_ij J_ij S_i S_j whose geometry
dependence lies in the couplings; the on-site curves' own change is its error, and for moves of
several ions also the change of their mutual coupling. That error is measured whenever a
competitor is evaluated again (predicted vs evaluated) and widens the allowance with the age of the
reference. A step evaluates only the competitors predicted within margin + safety x (error per
step) x age (sized apart beyond max_age, below) in energy-only batches; none: S0 is certified
lowest with no evaluation at all (never before an error was measured). Until a kind's error is
measured (below), only its probes are evaluated first: the `probes` predicted nearest and the `probes`
whose predicted gap moved most since their reference; the error measured on them names the rest
within the allowance at the same geometry (`check`: batch after batch until none is left). On a
trained LiNiO2 model with 8 Ni the first check had evaluated all 276 competitors. The caller moves the
moments when an evaluated competitor is lower. An ensemble's members each hold a certificate of
their own state from one explore frame to the next (spingen.tasks.explore.MemberStates).

A canonical-sign model evaluates each configuration in its gauge (the sign that puts the total
moment up), so its energy is smooth in the moments only within one gauge sector: a competitor in
another sector than S0 keeps the gap of its reference (-dE/dS at S0 says nothing of it).

The prediction error is measured for five kinds of competitor apart, since they differ by two
orders of magnitude (a trained LiNiO2 model at 900 K: median 0.1 meV per step for magnitude
changes, 3-10 meV with a reversed ion): those that only change magnitudes (every changed ion keeps
its sign), a single ion reversed (or leaving or reaching a zero moment), several ions changed of
which at least one reversed, those in another gauge sector, and the exchanges whose gaps follow their
anchors (below).

The error grows faster than the age while the ions move away from the reference geometry (on that
trained model the errors of references 21 geometries old reached 3.1 times the allowance the errors
measured at younger ages call for) and stops growing once they have moved their thermal amplitude
(tens of fs). So references older than max_age are measured apart: until their kind's error at such
ages is measured its probes are evaluated, and those the error measured on them names; from then on
only those within margin + safety x (the larger of the two errors per step) x age (the error at such
ages kept as measured, undecayed), and every one older than backstop_age (5 x max_age unless set).

A reversed ion's virtual atom moves by 2 eta |S| (about 1 A), beyond the reach of the slope at S0:
on that trained model, following the change of -dE/dS on the reversed ions predicts their gaps 2-3
times worse than keeping the reference's share of them (90th percentile 27 vs 10 meV per step),
while in a landscape of fields on the ions it is exact for a single ion. So each kind's gaps are
predicted both ways at every evaluation, their errors measured apart, and the way with the smaller
measured error is used (following, until keeping is measured better); ions that keep their sign
always follow.

After a move S0 -> S1 (a competitor found lower), S1's competitors are not all evaluated again:
each that S0's single- and two-ion gaps speak for, within S0's sector, gets the second-order
expansion E(c) - E(S0) = sum_i G_i + sum_ij (G_ij - G_i - G_j) over the ions where c differs
from S0 (exact for two ions or fewer, and in an on-site + pair landscape), widened by the
measured error of such carried gaps. A competitor whose changed ions the move left alone and whose
expansion needs gaps S0 lacks (beyond pair_limit: an exchange, or a single-ion move, beside a moved
ion) keeps the gap of the same change made to S0, G_c = G_{c - S1 + S0}: exact when the two changes
do not couple, their coupling being its error, measured apart from the expansion's; three ways, each with
its own measured error, since they differ by two orders of magnitude (on a trained LiNiO2 model with 27 Ni
the largest errors were 640 meV with a reversed ion, 6 meV for magnitudes followed): a change with a
reversed ion keeps it (UNTOUCHED); a change of magnitudes only adds its coupling to the move to first
order, the move's change of -dE/dS on its ions (FOLLOWED; exact for bilinear couplings); a change into
the other gauge sector keeps it too, S0 and S1 in one sector, G_c and its twin in the other (CROSSED;
exact in a reversal-symmetric landscape). Only the rest, and the carried ones within the allowance, are
evaluated.

Beyond pair_limit, a two-ion competitor c (an exchange) with a reversed ion would keep its gap (its two
reversed ions' shares drift 8 meV per step in the median, up to 86, on a trained LiNiO2 model with 27 Ni:
docs/benchmarks/spin_md.md, "Exchanges that follow their anchors"). So its gap is split at its reference
into the gaps of its two anchors (S0 with one of c's ions changed as in c, in S0's gauge sector, where
the energy is smooth) and their coupling, E(c) - E(S0) = A_i + A_j + J_c, and c's gap is predicted from
its anchors' gaps and its coupling kept (kind PAIRED): exact in a landscape of on-site and pair energies,
where J_c depends on the two ions alone; on that model the couplings moved 0.06 meV per step in the median,
6 at most. An anchor is evaluated at a geometry only where a competitor named for evaluation rests on it
(the caller's anchor_gaps, 2 per reversed ion at most); one evaluated before keeps its gap, its allowance
safety x the measured change of anchors' gaps per geometry x its age (inf until measured): on that model
half the anchors at each step (their gaps moved 5 meV per step in the median, 37 at most, along 60 MD steps;
on another run the change of -dE/dS at S0 told little of them: correlation -0.1). A move that leaves c's
ions alone carries their coupling over (COUPLED); one that moves an ion of c scales the coupling of the same
two ions' exchange of S0 by the product of their changes, new over old (SCALED: exact for bilinear couplings
J_ij S_i S_j; erred 3 meV on that model).

The moments of a near-degenerate landscape go back and forth between a few states. The certificate
remembers the references of the last states it left (remembered_states): back at one of them, its
competitors take their remembered references, aged by the geometries since, where those allow less
than the carried gaps (not a gap a move carried with a pair's coupling, whose allowance sized that
coupling); a move across the gauge sector back to a state held a few steps before then
evaluates only what the allowance names, not every competitor of the other sector. A caller that jumps
back to a remembered state, no move away (an explore member returning to a state it visited),
`resume`s it: its competitors take their remembered references alone.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from spingen.spin.levels import MomentLevels

SAME_ENERGY = 1e-6  # eV: a competitor lower than the current moments by less is numerical noise
ERROR_MEMORY = 0.9  # a measured error is kept as the running maximum, decayed by this at each later geometry
# (0.7 forgot too fast once the reversals keep their gaps: a two-ion competitor erred by 6.7 meV per step
# where the decayed maximum said 1.3, and a change of the ground state was missed)
MAGNITUDES, REVERSALS, SEVERAL_REVERSED, OTHER_SECTOR, PAIRED = range(5)  # competitor kinds, each with its own error
N_KINDS = 5
EVALUATED, COUPLED, EXPANDED, UNTOUCHED, CROSSED, FOLLOWED, SCALED = range(7)  # how a gap was last set:
# evaluated, or carried over a move (move_to: a PAIRED competitor's coupling carried, expanded, kept for an
# untouched change with a reversed ion, kept for an untouched change into the other gauge sector, kept for an
# untouched change of magnitudes following the move's change of -dE/dS, or a PAIRED competitor's coupling
# carried from the same ion pair and scaled to its changes; an expansion's allowance adds those of the gaps it uses)
CARRY_ERRORS = {EXPANDED: "move_error", UNTOUCHED: "untouched_error", CROSSED: "crossed_error",
                FOLLOWED: "followed_error", COUPLED: "coupling_error",
                SCALED: "scaled_error"}  # the attribute of each way's measured error


@dataclass(frozen=True)
class CertificateSettings:
    """The knobs of the certificate (param.json: model_devi_spin_certify)."""

    margin: float = 0.002  # eV (of the cell): a competitor predicted closer than this is evaluated
    max_age: int = 20  # references older than this are sized by the larger of the errors measured at any age
    # and at such ages (until the latter is measured: their probes, and what the error measured on them names)
    backstop_age: int | None = None  # and no reference is trusted beyond this many geometries (None: 5 x max_age)
    search_every: int = 500  # and run a full warm search at least this often (moves of several ions)
    pair_limit: int = 300  # two-ion moves are competitors too when a configuration has at most this many
    exchange_limit: int = 500  # else exchanges of two ions' moments, when a configuration has at most this many
    # (27 ions: at most 351; their gaps follow their anchors, evaluated where a competitor named rests on them)
    safety: float = 2.0  # times the measured prediction error per step, times the age
    probes: int = 4  # a kind whose error is not measured: this many nearest and most changed evaluated first (0: all)
    remembered_states: int = 8  # the references of this many states left last are kept for a return

    def __post_init__(self) -> None:
        if not self.margin >= 0:
            raise ValueError(f"margin must be >= 0 eV, got {self.margin}")
        for name in ("pair_limit", "exchange_limit"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.probes < 0:
            raise ValueError(f"probes must be >= 0, got {self.probes}")
        if self.remembered_states < 0:
            raise ValueError(f"remembered_states must be >= 0, got {self.remembered_states}")
        for name in ("max_age", "search_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.backstop_age is not None and self.backstop_age < self.max_age:
            raise ValueError(f"backstop_age must be >= max_age ({self.max_age}), got {self.backstop_age}")
        if not self.safety >= 0:
            raise ValueError(f"safety must be >= 0, got {self.safety}")

    @property
    def trusted_age(self) -> int:
        """Geometries after which every competitor is evaluated, however far its gap."""
        return 5 * self.max_age if self.backstop_age is None else self.backstop_age


def pair_moves(levels: MomentLevels, row: np.ndarray) -> np.ndarray:
    """Every allowed level-index row in which exactly two ions of `row` changed level."""
    row = np.asarray(row, dtype=np.int8).reshape(-1)
    others = [np.flatnonzero(np.arange(n) != row[i]) for i, n in enumerate(levels.n_values)]
    found = []
    for i in range(levels.n_magnetic):
        for j in range(i + 1, levels.n_magnetic):
            li, lj = np.meshgrid(others[i], others[j], indexing="ij")
            moves = np.repeat(row[None, :], li.size, axis=0)
            moves[:, i], moves[:, j] = li.ravel(), lj.ravel()
            found.append(moves)
    if not found:
        return np.empty((0, levels.n_magnetic), dtype=np.int8)
    moves = np.concatenate(found)
    return moves[levels.is_allowed(moves)]


def n_pair_moves(levels: MomentLevels) -> int:
    """How many two-ion moves a configuration has (at most; a fixed total moment allows fewer)."""
    k = levels.n_values - 1
    return int((k.sum() ** 2 - (k**2).sum()) // 2)


def competitors(levels: MomentLevels, moments: np.ndarray, lowest: list[np.ndarray] | None = None,
                pair_limit: int = 0, first_up: bool = False, exchange_limit: int = 0) -> np.ndarray:
    """Every allowed single-ion move of `moments`, every two-ion move when there are at most pair_limit of
    them (else every exchange of two ions' moments when there are at most exchange_limit of those), then
    the configurations of `lowest` that differ from it. Under a fixed global sign S and -S
    are one state: each is given in the orientation nearest to `moments` (right for a reversal-symmetric
    energy), or first-up with first_up=True (the representative the search evaluates, for an energy
    that is not symmetric)."""
    moments = np.asarray(moments, dtype=float)
    row = levels.to_indices(moments)[0]
    moves = levels.single_moves(row)
    if 0 < n_pair_moves(levels) <= pair_limit:
        moves = np.concatenate([moves, pair_moves(levels, row)])
    elif exchange_limit:
        exchanges = levels.exchange_moves(row)
        if len(exchanges) <= exchange_limit:
            moves = np.concatenate([moves, exchanges])
    if first_up and levels.fix_global_sign and len(moves):
        moves = levels.first_up(moves)
    found = [levels.to_moments(moves)] if len(moves) else []
    for state in lowest or ():
        state = np.asarray(state, dtype=float)
        nearer = np.abs(-state - moments).sum() < np.abs(state - moments).sum()
        if levels.fix_global_sign and nearer and not first_up:
            state = -state
        if np.abs(state - moments).max() > 1e-9:
            found.append(state[None])
    if not found:
        return np.empty((0, levels.n_magnetic))
    return np.unique(np.round(np.concatenate(found), 9), axis=0)


class GroundStateCertificate:
    """The competitors of the held moments S0, each with the gap and the -dE/dS at S0 of the geometry
    where it was last evaluated (its own reference), and how many geometries ago that was."""

    def __init__(self, levels: MomentLevels, settings: CertificateSettings | None = None,
                 gauge: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """gauge: the sign (n,) the energy model applies to each configuration (n, n_magnetic) before it
        sees it (SpinEncoding.gauge_signs of a canonical encoding); the energy is smooth in the moments only
        within one sign. None: smooth everywhere."""
        self.levels = levels
        self.settings = settings or CertificateSettings()
        self.gauge = gauge
        self.moments: np.ndarray | None = None  # S0; None: no reference (the caller evaluates every competitor)
        self.competitors = np.empty((0, levels.n_magnetic))
        self.gaps = np.empty(0)  # E(c) - E(S0) at each competitor's reference
        self.minus_grads = np.empty((0, levels.n_magnetic))  # -dE/dS at S0 at each competitor's reference
        self.ages = np.empty(0, dtype=int)  # geometries since each competitor's reference
        self.slack = np.empty(0)  # eV: the allowance of a gap carried over from the previous moments (move_to)
        self.carried = np.empty(0, dtype=int)  # EVALUATED, or how the gap was carried (COUPLED, ..., SCALED)
        self.step_errors = np.full(N_KINDS, np.nan)  # measured |predicted - evaluated| gap per geometry by kind, eV
        self.move_error: float | None = None  # measured |expanded - evaluated| gap after a move, eV
        self.untouched_error: float | None = None  # measured |kept - evaluated| gap of a change the move left alone
        self.crossed_error: float | None = None  # the same, of such a change into the other gauge sector
        self.followed_error: float | None = None  # the same, of such a change of magnitudes only, followed
        self.scaled_error: float | None = None  # measured |predicted - evaluated| gap with a coupling scaled
        self.coupling_error: float | None = None  # measured |predicted - evaluated| gap with a carried coupling
        self.kinds = np.empty(0, dtype=int)  # each competitor's kind (MAGNITUDES, ..., PAIRED)
        self.way_errors = np.full((N_KINDS, 2), np.nan)  # error per geometry by kind, [following, keeping] reversals
        self.old_way_errors = np.full((N_KINDS, 2), np.nan)  # the same, of references older than max_age
        self.follow = np.ones(N_KINDS, dtype=bool)  # by kind: reversed ions' shares follow the change of -dE/dS
        self.anchors = np.empty((0, levels.n_magnetic))  # S0 with one ion of a two-ion competitor changed
        self.anchor_of = np.empty((0, 2), dtype=int)  # each competitor's two anchors (-1: none)
        self.couplings = np.empty(0)  # E(c) - E(S0) minus its anchors' gaps at c's reference (NaN: not known)
        self.anchor_gaps = np.empty(0)  # the anchors' gaps in S0's gauge sector where each was last evaluated
        self.anchor_clocks = np.empty(0, dtype=int)  # the clock of each anchor's gap (-1: not evaluated)
        self.anchor_error: float | None = None  # measured |change| of an anchor's gap per geometry
        self._anchor_source: tuple | None = None  # (clock, anchors -> their gaps at that geometry)
        self.clock = 0  # geometries seen (tick)
        self._sampled_at: dict = {}  # error (kind or name) -> the clock of its last sample (decayed once per geometry)
        self.memory: dict[bytes, _Remembered] = {}  # the references of the states left last, oldest first

    def __getstate__(self) -> dict:
        """A copy leaves the caller's way to evaluate anchors behind (it belongs to one geometry and model)."""
        return {**self.__dict__, "_anchor_source": None}

    def holds_for(self, moments: np.ndarray) -> bool:
        """Whether the certificate speaks of these moments (else the caller evaluates every competitor)."""
        return self.moments is not None and np.allclose(moments, self.moments, atol=1e-9)

    def predicted_gaps(self, minus_grad: np.ndarray, indices: np.ndarray | slice = slice(None),
                       follow_reversals: bool | None = None) -> np.ndarray:
        """E(c) - E(S0) of competitors[indices] at the geometry where -dE/dS at S0 is minus_grad (the gap at
        the reference for a competitor in another gauge sector, where -dE/dS at S0 says nothing of it).
        follow_reversals: whether reversed ions' shares follow -dE/dS too (None: each kind's measured way)."""
        kinds, competitors = self.kinds[indices], self.competitors[indices]
        follow = self.follow[kinds] if follow_reversals is None else np.full(len(kinds), follow_reversals)
        shares = (np.asarray(minus_grad, dtype=float) - self.minus_grads[indices]) * (competitors - self.moments)
        shares = np.where(follow[:, None] | (np.sign(competitors) == np.sign(self.moments)), shares, 0.0)
        gaps = self.gaps[indices] - np.where(kinds != OTHER_SECTOR, shares.sum(axis=1), 0.0)
        return np.where(kinds == PAIRED, self._paired_gaps(indices), gaps)

    def _paired_gaps(self, indices: np.ndarray | slice) -> np.ndarray:
        """Of competitors[indices]: the last gaps of their two anchors plus their coupling (NaN where an anchor
        was never evaluated or the coupling is not known; `_anchor_allowance` sizes anchors evaluated before)."""
        return self._anchor_sums(indices) + self.couplings[indices]

    def _anchor_sums(self, indices: np.ndarray | slice, here: bool = False) -> np.ndarray:
        """Of competitors[indices]: the sum of their two anchors' last gaps (NaN: none, or with here=True one
        not evaluated at this geometry)."""
        anchor_of = self.anchor_of[indices]
        if not len(self.anchors):
            return np.full(len(anchor_of), np.nan)
        gaps = np.where(self.anchor_clocks == self.clock, self.anchor_gaps, np.nan) if here else self.anchor_gaps
        return np.where(anchor_of >= 0, gaps[np.maximum(anchor_of, 0)], np.nan).sum(axis=1)

    def _anchor_ages(self) -> np.ndarray:
        """Of each competitor: the geometries since its two anchors were evaluated, summed (0: here, or none)."""
        if not len(self.anchors):
            return np.zeros(len(self.competitors), dtype=int)
        ages = np.where(self.anchor_of >= 0, self.clock - self.anchor_clocks[np.maximum(self.anchor_of, 0)], 0)
        return ages.sum(axis=1)

    def _anchor_allowance(self) -> np.ndarray:
        """Of each competitor: safety x the measured change of an anchor's gap per geometry x its anchors' ages
        (inf where that error is not measured or no anchor can be evaluated at this geometry; 0 for a competitor
        whose anchors were all evaluated here, or of another kind than PAIRED)."""
        ages = np.where(self.kinds == PAIRED, self._anchor_ages(), 0)
        if self.anchor_error is None or not self._anchors_evaluable():
            return np.where(ages > 0, np.inf, 0.0)
        return self.settings.safety * self.anchor_error * ages

    def _anchors_evaluable(self) -> bool:
        """Whether the caller gave a way to evaluate anchors at this geometry."""
        return self._anchor_source is not None and self._anchor_source[0] == self.clock

    def anchors_of(self, moments: np.ndarray, competitors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(the anchors, each competitor's two rows of them, -1 for none): for a competitor c of `moments` S0
        that changes two ions i, j of which at least one reverses, within S0's gauge sector, the states of S0
        with i, and with j, changed as in c. Without two-ion moves of every ion pair (pair_limit), none."""
        competitors = np.asarray(competitors, dtype=float).reshape(-1, self.levels.n_magnetic)
        anchor_of = np.full((len(competitors), 2), -1)
        if 0 < n_pair_moves(self.levels) <= self.settings.pair_limit or not len(competitors):
            return np.empty((0, self.levels.n_magnetic)), anchor_of
        moments = np.asarray(moments, dtype=float)
        changed = np.abs(competitors - moments) > 1e-9
        reversed_ = changed & (np.sign(competitors) != np.sign(moments))
        chosen = (changed.sum(axis=1) == 2) & reversed_.any(axis=1) \
            & (self.sectors(competitors) == self.sectors(moments)[0])
        found: dict[bytes, int] = {}
        states = []
        for c in np.flatnonzero(chosen):
            for end, ion in enumerate(np.flatnonzero(changed[c])):
                state = moments.copy()
                state[ion] = competitors[c, ion]
                key = state_key(state)
                if key not in found:
                    found[key] = len(states)
                    states.append(state)
                anchor_of[c, end] = found[key]
        return (np.array(states) if states else np.empty((0, self.levels.n_magnetic))), anchor_of

    def _evaluate_anchors(self, rows: np.ndarray) -> None:
        """Evaluate anchors[rows] at this geometry (the caller's anchor_gaps): the change of those evaluated
        before, per geometry, is their measured error."""
        if not len(rows):
            return
        gaps = np.asarray(self._anchor_source[1](self.anchors[rows]), dtype=float).reshape(-1)
        if len(gaps) != len(rows):
            raise ValueError(f"{len(rows)} anchor gaps expected, got {len(gaps)}")
        ages = self.clock - self.anchor_clocks[rows]
        before = (self.anchor_clocks[rows] >= 0) & (ages > 0) & np.isfinite(self.anchor_gaps[rows]) & np.isfinite(gaps)
        if before.any():
            self._sample("anchor_error", np.abs(gaps - self.anchor_gaps[rows])[before] / ages[before])
        self.anchor_gaps[rows], self.anchor_clocks[rows] = gaps, self.clock

    def _set_anchor_source(self, anchor_gaps: Callable[[np.ndarray], np.ndarray] | None) -> None:
        """anchor_gaps: anchors (k, n_magnetic) -> E - E(S0) of each in S0's gauge sector at this geometry (one
        energy-only batch); None: no anchor is evaluated here."""
        self._anchor_source = None if anchor_gaps is None else (self.clock, anchor_gaps)

    def _set_competitors(self, moments: np.ndarray, competitors: np.ndarray) -> None:
        """Hold `moments` with these competitors: their kinds and anchors (no coupling or anchor gap known yet)."""
        moments = np.asarray(moments, dtype=float).copy()
        competitors = np.array(competitors, dtype=float).reshape(-1, self.levels.n_magnetic)
        anchors, anchor_of = self.anchors_of(moments, competitors)
        self.moments, self.competitors, self.anchors, self.anchor_of = moments, competitors, anchors, anchor_of
        self.kinds = self.kinds_of(competitors)
        self.couplings = np.full(len(competitors), np.nan)
        self.anchor_gaps, self.anchor_clocks = np.full(len(anchors), np.nan), np.full(len(anchors), -1)

    def _measure_couplings(self, indices: np.ndarray, gaps: np.ndarray) -> None:
        """Competitors[indices] evaluated here at these gaps: with the anchors evaluated here too, their couplings
        are measured (kind PAIRED); without, a PAIRED one among them keeps its gap again (its coupling's age is
        no longer its reference's)."""
        couplings = gaps - self._anchor_sums(indices, here=True)  # NaN unless the anchors were evaluated here
        known = np.isfinite(couplings)
        self.couplings[indices] = couplings
        self.kinds[indices[known]] = PAIRED
        lost = indices[~known & (self.kinds[indices] == PAIRED)]
        if len(lost):
            self.kinds[lost] = self.kinds_of(self.competitors[lost])

    def tick(self) -> None:
        """A new geometry: every competitor's reference, and every remembered one, is one geometry older."""
        self.ages += 1
        self.clock += 1
        self._anchor_source = None  # the caller's anchor evaluation belongs to the geometry before

    def to_check(self, minus_grad: np.ndarray,
                 anchor_gaps: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """At a new geometry (ticks): the indices of the competitors that must be evaluated, those predicted
        within margin + safety x error per step x age, or older than trusted_age (of a kind whose error is not
        measured yet, its probes: still_to_check names the rest). Empty: S0 is certified lowest here without an
        evaluation. anchor_gaps: anchors (k, n_magnetic) -> E - E(S0) of each in S0's gauge sector at this
        geometry, called for the anchors of the competitors named (without it the PAIRED competitors whose
        anchors were evaluated before are named)."""
        self.tick()
        self._set_anchor_source(anchor_gaps)
        return self._named(minus_grad)

    def still_to_check(self, minus_grad: np.ndarray) -> np.ndarray:
        """After `update` at this geometry: the competitors not evaluated here that the errors measured so far
        bring within the allowance (or the next probes of a kind still unmeasured). Empty: S0 is lowest here."""
        named = self._named(minus_grad)
        return named[~self._evaluated_here()[named]]

    def _named(self, minus_grad: np.ndarray) -> np.ndarray:
        """The competitors within the allowance here (`_within_allowance`), the anchors of those named evaluated
        here first (batch after batch, as long as fresh anchors name more competitors)."""
        while True:
            named = self._within_allowance(self.predicted_gaps(minus_grad))
            if not (len(self.anchors) and self._anchors_evaluable()):
                return named
            rows = np.unique(self.anchor_of[named])
            rows = rows[(rows >= 0)]
            rows = rows[self.anchor_clocks[rows] != self.clock]
            if not len(rows):
                return named
            self._evaluate_anchors(rows)

    def check(self, indices: np.ndarray, energy: float, minus_grad: np.ndarray,
              evaluate: Callable[[np.ndarray], np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Evaluate competitors[indices] (evaluate: configurations -> energies, one batch), take them as
        references (`update`), then those still_to_check names, until one is lower than S0 (at `energy`) or
        not finite, or none is left (with probes 0: one batch, the rule before probes): (the competitors
        evaluated, their energies). Each competitor is evaluated at most once."""
        pools, found = [np.empty((0, self.levels.n_magnetic))], [np.empty(0)]
        while len(indices):
            pools.append(self.competitors[indices])
            found.append(np.asarray(evaluate(pools[-1]), dtype=float))
            self.update(indices, energy, minus_grad, found[-1])
            finite = np.isfinite(energy) and np.all(np.isfinite(found[-1]))  # finite gaps: evaluated here
            if not (self.settings.probes and finite and found[-1].min() >= energy - SAME_ENERGY):
                break
            indices = self.still_to_check(minus_grad)
        return np.concatenate(pools), np.concatenate(found)

    def resume(self, moments: np.ndarray, competitors: np.ndarray) -> bool:
        """Hold `moments` again, a remembered state (not a move from S0): its `competitors` take their remembered
        references aged by the geometries since, those without one no gap (to_check names them). False where
        the state is not remembered (the caller evaluates every competitor)."""
        key = state_key(moments)
        past = self.memory.pop(key, None)
        if past is None:
            return False
        self._remember()  # the state left; `past` is kept apart, so no limit forgets it
        self.memory.setdefault(key, past)  # (references just remembered of the same state are the fresher)
        self._set_competitors(moments, competitors)
        n = len(self.competitors)
        self.gaps, self.minus_grads = np.full(n, np.nan), np.zeros((n, self.levels.n_magnetic))
        self.ages, self.slack, self.carried = np.zeros(n, dtype=int), np.zeros(n), np.full(n, EVALUATED)
        self._recall()
        return True

    def release(self) -> None:
        """Hold no moments (the caller evaluates every competitor next); the references are remembered."""
        self._remember()
        self.moments = None

    def _within_allowance(self, gaps: np.ndarray) -> np.ndarray:
        """Competitors predicted within margin + slack + safety x error per step of their kind x age (beyond
        max_age the larger of its errors at any age and at such ages), or older than the settings' trusted_age.
        Where that error is not measured yet: the probes of each kind (and of its references older than
        max_age), or with probes 0 all of them."""
        allowance = self.settings.margin + self._uncertainty(self.kinds, self.ages, self.slack) \
            + self._anchor_allowance()
        named = ~(gaps > allowance)  # and every gap nothing speaks for (NaN)
        if self.settings.probes:
            unmeasured = np.isnan(self._error_per_step(self.kinds, self.ages)) & np.isfinite(gaps) \
                & ~self._evaluated_here()
            named = (named & ~unmeasured) | self._probes(gaps, unmeasured)
        return np.flatnonzero(named | (self.ages > self.settings.trusted_age))

    def _probes(self, gaps: np.ndarray, unmeasured: np.ndarray) -> np.ndarray:
        """Of each kind's unmeasured competitors (young and old apart; evaluated references before carried gaps):
        the `probes` predicted nearest and the `probes` whose predicted gap moved most from their reference's,
        whose errors size the rest."""
        chosen = np.zeros(len(gaps), dtype=bool)
        n = self.settings.probes
        old = self.ages > self.settings.max_age
        for kind in np.unique(self.kinds[unmeasured]):
            for group in (unmeasured & (self.kinds == kind) & old, unmeasured & (self.kinds == kind) & ~old):
                if np.any(group & (self.carried == EVALUATED)):  # a carried gap's error is not its kind's
                    group &= self.carried == EVALUATED
                members = np.flatnonzero(group)
                moved = np.nan_to_num(np.abs(gaps[members] - self.gaps[members]), nan=np.inf)
                chosen[members[np.argsort(gaps[members], kind="stable")[:n]]] = True
                chosen[members[np.argsort(-moved, kind="stable")[:n]]] = True
        return chosen

    def _evaluated_here(self) -> np.ndarray:
        """Competitors whose reference is this geometry (evaluated since the last tick; not a gap move_to left
        unknown)."""
        return (self.ages == 0) & (self.carried == EVALUATED) & np.isfinite(self.gaps)

    def _error_per_step(self, kinds: np.ndarray, ages: np.ndarray) -> np.ndarray:
        """The measured error per geometry of each competitor's kind (beyond max_age the larger of it and the
        kind's error measured beyond max_age); NaN where one it needs is not measured yet."""
        per_step = self.step_errors[kinds]
        old = (ages > self.settings.max_age) & (self.settings.trusted_age > self.settings.max_age)
        return np.where(old, np.maximum(per_step, self._old_step_errors()[kinds]), per_step)  # NaN propagates

    def _uncertainty(self, kinds: np.ndarray, ages: np.ndarray, slack: np.ndarray) -> np.ndarray:
        """slack + safety x measured error per step of the kind x age (inf where it is not measured)."""
        per_step = self._error_per_step(kinds, ages)
        return np.where(np.isnan(per_step), np.inf, slack + self.settings.safety * per_step * ages)

    def _old_step_errors(self) -> np.ndarray:
        """By kind: the error per geometry measured on references older than max_age, the kind's way."""
        return self._kinds_way(self.old_way_errors)

    def _kinds_way(self, way_errors: np.ndarray) -> np.ndarray:
        """By kind: the column of way_errors (N_KINDS, [following, keeping]) for the way each kind uses now."""
        return np.where(self.follow, way_errors[:, 0], way_errors[:, 1])

    def update(self, indices: np.ndarray, energy: float, minus_grad: np.ndarray, energies: np.ndarray) -> None:
        """Competitors[indices] evaluated at this geometry (S0 at `energy`, -dE/dS): their prediction error
        is measured (it sizes the allowance), then they take this geometry as their reference."""
        if not len(indices):
            return
        gaps = np.asarray(energies, dtype=float) - float(energy)
        errors = np.abs(self.predicted_gaps(minus_grad, indices) - gaps)
        how = self.carried[indices]
        carried = how != EVALUATED  # gaps carried over by a move: their error is the move's
        for way, name in CARRY_ERRORS.items():
            measured = (how == way) & np.isfinite(errors)
            if measured.any():
                self._sample(name, errors[measured])
        ages = np.maximum(self.ages[indices], 1)
        ways = [np.abs(self.predicted_gaps(minus_grad, indices, follow) - gaps) / ages for follow in (True, False)]
        old = ages > self.settings.max_age
        for kind in range(len(self.step_errors)):
            stepped = ~carried & np.isfinite(errors) & (self.kinds[indices] == kind)
            if stepped.any():
                memory = ERROR_MEMORY if self._first_sample(kind) else 1.0
                for way, way_errors in enumerate(ways):
                    self.way_errors[kind, way] = _running_max(self.way_errors[kind, way], way_errors[stepped], memory)
                    if (stepped & old).any():  # kept undecayed: few references grow that old again
                        self.old_way_errors[kind, way] = np.fmax(self.old_way_errors[kind, way],
                                                                 way_errors[stepped & old].max())
                self.follow[kind] = not self.way_errors[kind, 1] < self.way_errors[kind, 0]
                self.step_errors[kind] = self.way_errors[kind, 0 if self.follow[kind] else 1]
        self.gaps[indices], self.minus_grads[indices], self.ages[indices] = gaps, minus_grad, 0
        self.slack[indices], self.carried[indices] = 0.0, EVALUATED
        self._measure_couplings(np.asarray(indices), gaps)

    def _sample(self, name: str, errors: np.ndarray) -> None:
        """Take these errors into the running maximum held in attribute `name` (None: none yet)."""
        kept = getattr(self, name)
        memory = ERROR_MEMORY if self._first_sample(name) else 1.0
        setattr(self, name, _running_max(np.nan if kept is None else kept, errors, memory))

    def _first_sample(self, error) -> bool:
        """Whether `error` (a kind, or a name of CARRY_ERRORS) takes its first sample here."""
        first = self._sampled_at.get(error) != self.clock
        self._sampled_at[error] = self.clock
        return first

    def absorb_errors(self, other: GroundStateCertificate) -> None:
        """Keep the larger of each prediction error measured here and by `other`, a certificate of another
        state under the same model along the same geometries (errors measured once are not forgotten)."""
        self.way_errors = np.fmax(self.way_errors, other.way_errors)
        self.old_way_errors = np.fmax(self.old_way_errors, other.old_way_errors)
        self.follow = ~(self.way_errors[:, 1] < self.way_errors[:, 0])
        self.step_errors = self._kinds_way(self.way_errors)
        for name in (*CARRY_ERRORS.values(), "anchor_error"):
            errors = [e for e in (getattr(self, name), getattr(other, name)) if e is not None]
            setattr(self, name, max(errors) if errors else None)

    def set_reference(self, moments: np.ndarray, energy: float, minus_grad: np.ndarray,
                      competitors: np.ndarray, competitor_energies: np.ndarray,
                      anchor_gaps: Callable[[np.ndarray], np.ndarray] | None = None) -> None:
        """A new S0 with every competitor evaluated at this geometry (the measured error is kept; the old S0's
        references are remembered). anchor_gaps: as to_check's, here called for all the anchors of the new
        competitors (their couplings are then known)."""
        self._remember()
        self._set_competitors(moments, competitors)
        self._set_anchor_source(anchor_gaps)
        if len(self.anchors) and anchor_gaps is not None:
            self._evaluate_anchors(np.arange(len(self.anchors)))
        self.gaps = np.asarray(competitor_energies, dtype=float) - float(energy)
        self.minus_grads = np.tile(np.asarray(minus_grad, dtype=float), (len(self.competitors), 1))
        self.ages = np.zeros(len(self.competitors), dtype=int)
        self.slack = np.zeros(len(self.competitors))
        self.carried = np.full(len(self.competitors), EVALUATED)
        self._measure_couplings(np.arange(len(self.competitors)), self.gaps)

    def kinds_of(self, competitors: np.ndarray) -> np.ndarray:
        """The kind of each competitor of the held moments (MAGNITUDES, REVERSALS, SEVERAL_REVERSED or
        OTHER_SECTOR)."""
        competitors = np.asarray(competitors, dtype=float).reshape(-1, self.levels.n_magnetic)
        changed = np.abs(competitors - self.moments) > 1e-9
        same_sign = np.sign(competitors) * np.sign(self.moments) > 0
        reversal = np.where(changed.sum(axis=1) == 1, REVERSALS, SEVERAL_REVERSED)
        kinds = np.where(np.all(same_sign | ~changed, axis=1), MAGNITUDES, reversal)
        return np.where(self.sectors(competitors) == self.sectors(self.moments)[0], kinds, OTHER_SECTOR)

    def sectors(self, states: np.ndarray) -> np.ndarray:
        """The gauge sign of each configuration (all +1 without a gauge)."""
        states = np.atleast_2d(np.asarray(states, dtype=float))
        return np.ones(len(states)) if self.gauge is None else np.asarray(self.gauge(states), dtype=float)

    def move_to(self, moments: np.ndarray, competitors: np.ndarray, minus_grad_before: np.ndarray,
                minus_grad: np.ndarray, symmetric: bool,
                anchor_gaps: Callable[[np.ndarray], np.ndarray] | None = None) -> np.ndarray:
        """The held moments move from S0 to `moments`, a competitor of S0 evaluated at this geometry (where
        -dE/dS is minus_grad_before at S0 and minus_grad at `moments`). The new `competitors` take the gaps
        S0's single- and two-ion moves predict here, without an evaluation: a state c that differs from S0
        on the ions D gets

            E(c) - E(S0) = sum_i G_i + sum_{i<j} (G_ij - G_i - G_j)        (i, j in D)

        from S0's single-ion gaps G_i and two-ion gaps G_ij: exact for |D| <= 2 (S0's own competitors),
        and for more ions in a landscape of on-site and pair energies; beyond it the measured move error
        is added to the allowance. Where those gaps are not known and c changes only ions the move left
        alone, c keeps the gap of the same change made to S0 (the measured untouched error added to its
        allowance). A competitor of a remembered `moments` takes its remembered reference
        instead where that allows less. symmetric: E(-S) = E(S) (a state stands for its reverse too).
        Returns the indices of the new competitors to evaluate now: those within the allowance, those no
        gaps of S0 speak for, and every one of more than two ions until a move error was measured (of a
        kind whose error is not measured: its probes; `check` names the rest). anchor_gaps: as to_check's,
        called for the anchors of the new competitors named (the couplings of those evaluated now are then
        measured)."""
        self._remember()
        old = self.moments
        states = np.concatenate([old[None], self.competitors])
        slack = self.slack + self._anchor_allowance()  # a PAIRED gap on anchors evaluated before: their age
        values = list(zip(np.concatenate([[0.0], self.predicted_gaps(minus_grad_before)]),
                          np.concatenate([[0], self.ages]), np.concatenate([[0.0], slack]),
                          np.concatenate([[EVALUATED], self.carried])))
        known = {state_key(-c): v for c, v in zip(states, values)} if symmetric else {}
        known.update({state_key(c): v for c, v in zip(states, values)})
        moments = np.asarray(moments, dtype=float)
        competitors = np.asarray(competitors, dtype=float).reshape(-1, self.levels.n_magnetic)
        moved = self._cluster_gap(moments, old, known, symmetric)  # exact: `moments` is one of S0's competitors
        estimates = [self._cluster_gap(c, old, known, symmetric) for c in competitors]
        field_change = (minus_grad_before, minus_grad)
        estimates = [e if np.isfinite(e[0]) else self._untouched_gap(c, old, moments, moved, known, symmetric,
                                                                      field_change)
                     for c, e in zip(competitors, estimates)]
        couplings = (self.competitors, self.couplings, self.ages)
        self._set_competitors(moments, competitors)
        self._set_anchor_source(anchor_gaps)
        self.gaps = np.array([e[0] for e in estimates], dtype=float) - moved[0]
        self.ages = np.array([e[1] for e in estimates], dtype=int)
        self.slack = np.array([e[2] for e in estimates], dtype=float)
        self.carried = np.array([e[3] for e in estimates], dtype=int)
        self.minus_grads = np.tile(np.asarray(minus_grad, dtype=float), (len(competitors), 1))
        self._recall()
        self._carry_couplings(old, *couplings, symmetric)
        return self._named(minus_grad)

    def _carry_couplings(self, old: np.ndarray, old_competitors: np.ndarray, couplings: np.ndarray,
                         ages: np.ndarray, symmetric: bool) -> None:
        """After a move from `old` (whose competitors, couplings and ages are given), within one gauge sector: a
        two-ion competitor whose ions the move left alone takes the coupling measured for the same change of
        `old` and its age (exact in a landscape of on-site and pair energies, where it depends on those two ions
        alone; COUPLED). One with a moved ion takes the coupling of `old`'s competitor on the same two ions,
        scaled by the product of the two ions' changes, new over old (exact for bilinear couplings
        J_ij S_i S_j; SCALED). Each way's error measured on such carried couplings is added to their allowance
        (inf until measured)."""
        flip = symmetric and np.abs(self.moments + old).sum() < np.abs(self.moments - old).sum()
        base, old_competitors = (-old, -old_competitors) if flip else (old, old_competitors)
        if self.sectors(base)[0] != self.sectors(self.moments)[0] or not len(old_competitors):
            return
        old_changes = old_competitors - base
        on_pair = {}  # the two ions an old competitor changes -> its row (two-ion competitors with a coupling)
        for k in np.flatnonzero((np.sum(np.abs(old_changes) > 1e-9, axis=1) == 2) & np.isfinite(couplings)):
            on_pair.setdefault(tuple(np.flatnonzero(np.abs(old_changes[k]) > 1e-9)), []).append(k)
        untouched = np.abs(self.moments - base) <= 1e-9
        for c in np.flatnonzero(self.anchor_of[:, 0] >= 0):
            if np.allclose(self.competitors[c], base, atol=1e-9):
                continue  # the moments left: their gap is the move's, exact here
            change = self.competitors[c] - self.moments
            ions = np.flatnonzero(np.abs(change) > 1e-9)
            rows = on_pair.get(tuple(ions), [])
            same = [k for k in rows if np.allclose(old_changes[k, ions], change[ions], atol=1e-9)]
            if untouched[ions].all() and same:  # the move's coupling to them is its error
                k, how, scale = same[0], COUPLED, 1.0
            elif not untouched[ions].all() and len(rows) == 1:
                k, how = rows[0], SCALED
                scale = float(np.prod(change[ions] / old_changes[k, ions]))
            else:
                continue
            self.couplings[c], self.kinds[c], self.ages[c] = scale * couplings[k], PAIRED, ages[k]
            error = getattr(self, CARRY_ERRORS[how])
            self.slack[c] = np.inf if error is None else error
            self.carried[c] = how

    def _remember(self) -> None:
        """Keep the held moments' references (the oldest remembered state is forgotten beyond the limit)."""
        if self.moments is None or not self.settings.remembered_states:
            return
        key = state_key(self.moments)
        self.memory.pop(key, None)
        self.memory[key] = _Remembered(self.clock, {state_key(c): i for i, c in enumerate(self.competitors)},
                                       self.gaps.copy(), self.minus_grads.copy(), self.ages.copy(), self.slack.copy(),
                                       self.carried.copy())
        while len(self.memory) > self.settings.remembered_states:
            self.memory.pop(next(iter(self.memory)))

    def _recall(self) -> None:
        """Back at a remembered S0: each competitor whose remembered reference (aged by the geometries since)
        allows less than its carried gap takes it; not a gap a move carried with a pair's coupling (COUPLED,
        SCALED): its allowance sized that coupling, which is not remembered."""
        past = self.memory.pop(state_key(self.moments), None)
        if past is None:
            return
        found = [(i, past.index[k]) for i, k in enumerate(map(state_key, self.competitors)) if k in past.index]
        if not found:
            return
        now, then = (np.array(column) for column in zip(*found))
        ages = past.ages[then] + (self.clock - past.clock)
        kinds = self.kinds[now]
        carried = self._uncertainty(kinds, self.ages[now], self.slack[now])
        better = (~(self._uncertainty(kinds, ages, past.slack[then]) >= carried) | np.isnan(self.gaps[now])) \
            & np.isfinite(past.gaps[then]) & ~np.isin(past.carried[then], (COUPLED, SCALED))
        now, then, ages = now[better], then[better], ages[better]
        self.gaps[now], self.minus_grads[now] = past.gaps[then], past.minus_grads[then]
        self.ages[now], self.slack[now], self.carried[now] = ages, past.slack[then], past.carried[then]

    def _cluster_gap(self, state: np.ndarray, old: np.ndarray, known: dict, symmetric: bool
                     ) -> tuple[float, int, float, int]:
        """(E(state) - E(S0), the oldest age it rests on, the allowance it adds, how it was carried): S0's own
        gap for S0 and its competitors, else the expansion in S0's single- and two-ion gaps within S0's gauge
        sector; NaN when a gap it needs is not known or the expansion would cross into another sector."""
        if state_key(state) in known:
            return known[state_key(state)]
        if self.gauge is not None:  # expand within the gauge sector, where the energy is smooth
            base, state = old * self.sectors(old)[0], state * self.sectors(state)[0]
        else:
            base = -old if symmetric and np.abs(state + old).sum() < np.abs(state - old).sum() else old
        ions = np.flatnonzero(np.abs(state - base) > 1e-9)
        subsets = [(a,) for a in range(len(ions))] + [(a, b) for a in range(len(ions)) for b in range(a + 1, len(ions))]
        partial = np.repeat(base[None], len(subsets), axis=0)
        for row, subset in zip(partial, subsets):
            row[ions[list(subset)]] = state[ions[list(subset)]]
        if np.any(self.sectors(partial) != self.sectors(base)[0]):
            return np.nan, 0, 0.0, EVALUATED
        used = [known.get(state_key(p)) for p in partial]
        if any(u is None for u in used):
            return np.nan, 0, 0.0, EVALUATED
        single = [u[0] for u in used[:len(ions)]]
        gap = sum(single) + sum(u[0] - single[s[0]] - single[s[1]] for s, u in zip(subsets[len(ions):], used[len(ions):]))
        slack = sum(u[2] for u in used) + (np.inf if self.move_error is None else self.move_error)
        return float(gap), max(u[1] for u in used), float(slack), EXPANDED

    def _untouched_gap(self, state: np.ndarray, old: np.ndarray, moments: np.ndarray, moved: tuple, known: dict,
                       symmetric: bool, field_change: tuple[np.ndarray, np.ndarray]) -> tuple[float, int, float, int]:
        """E(state) - E(S0) for a competitor of the new `moments` (reached from S0 at the gap `moved`) that
        changes only ions the move left alone: the move's gap plus S0's gap for the same change, their
        coupling taken as the error (the measured untouched error, inf until measured); NaN when the
        change touches a moved ion, S0's gap for it is not known, or the move crosses a gauge sector.
        Under a gauge, a change into the other sector (S0 and the new moments in one, the changed states in
        the other) is the same change of the other gauge's half, equal in a reversal-symmetric landscape: its
        error is measured apart (CROSSED). A change of magnitudes only (every changed ion keeps its sign) takes
        its coupling to the move to first order, the change of -dE/dS on its ions from S0 to the new moments
        (field_change: -dE/dS at S0 and at the new moments, here): exact with bilinear couplings, its error
        measured apart (FOLLOWED; on a trained LiNiO2 model with 27 Ni the largest error of such kept gaps was
        42 meV, followed 6, that of changes with a reversed ion 640)."""
        minus_grad_old, minus_grad = (np.asarray(g, dtype=float) for g in field_change)
        if symmetric and self.gauge is None:  # S and -S are one state: each taken nearest the new moments
            if np.abs(moments + old).sum() < np.abs(moments - old).sum():
                old, minus_grad_old = -old, -minus_grad_old  # E(-S) = E(S): the slope reverses with S
            if np.abs(moments + state).sum() < np.abs(moments - state).sum():
                state = -state
        changed = np.abs(state - moments) > 1e-9
        if np.any(changed & (np.abs(moments - old) > 1e-9)):
            return np.nan, 0, 0.0, EVALUATED
        shifted = old.copy()
        shifted[changed] = state[changed]
        sectors = self.sectors(np.stack([old, moments, shifted, state]))
        if sectors[1] != sectors[0] or sectors[3] != sectors[2]:
            return np.nan, 0, 0.0, EVALUATED  # each pair in one gauge sector, where the energy is smooth
        same = known.get(state_key(shifted))
        if same is None:
            return np.nan, 0, 0.0, EVALUATED
        gap = moved[0] + same[0]
        if sectors[2] != sectors[0]:
            how = CROSSED
        elif np.all(np.sign(state[changed]) == np.sign(moments[changed])):
            how = FOLLOWED
            gap -= float((minus_grad - minus_grad_old)[changed] @ (state - moments)[changed])
        else:
            how = UNTOUCHED
        error = getattr(self, CARRY_ERRORS[how])
        slack = same[2] + moved[2] + (np.inf if error is None else error)
        return gap, max(same[1], moved[1]), float(slack), how


def state_key(moments: np.ndarray) -> bytes:
    """A configuration's key in a dict of states (moments rounded to 1e-6 uB)."""
    return (np.round(np.asarray(moments, dtype=float), 6) + 0.0).tobytes()  # + 0.0: -0.0 is 0.0


def _running_max(kept: float, errors: np.ndarray, memory: float) -> float:
    """The largest of the new errors and the kept running maximum times memory (NaN: none yet)."""
    return max(float(np.max(errors)), memory * float(np.nan_to_num(kept)))


@dataclass(frozen=True)
class _Remembered:
    """The references of a state the certificate left: at clock `clock`, competitor key -> row of the arrays."""

    clock: int
    index: dict
    gaps: np.ndarray
    minus_grads: np.ndarray
    ages: np.ndarray
    slack: np.ndarray
    carried: np.ndarray
