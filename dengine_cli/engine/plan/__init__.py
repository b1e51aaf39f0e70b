"""The Difference Engine plan: what a host would do with every page of a set of VMs, and what the
VMs then cost in memory and time.

For each present page (VMs in the order given, then ascending gfn: the *scan order*) the plan
chooses one action (:data:`ACTIONS`):

* ``zero``: an all-zero page; costs nothing (mapped to the hypervisor's zero page).
* ``share``: a copy of a content kept elsewhere (within the VM, or in an earlier VM when the
  policy shares across VMs), exact as in :mod:`dengine_cli.sharing`.
* ``whole``: a page kept as it is (4096 bytes).
* ``patch``: stored as a patch against a *reference* page, a page kept whole (never a patched or
  compressed one); the patch's exact size is measured with the policy's patch codec.
* ``compress``: stored compressed with the policy's codec; exact size measured.
* ``swap``: paged out to make the VMs fit host memory (:mod:`dengine_cli.paging`).

How pages are chosen (decisions recorded here, tested in tests/test_plan.py):

* Candidates for patching and compression are the *kept* pages (the stored copy of each content)
  that are cold and whose content has exactly one copy in scope (all VMs when sharing across VMs,
  else the VM): a shared content stays whole, it may serve as a reference.  Hot pages
  (:mod:`dengine_cli.temperature`) are kept whole and may be references.
* Similarity (:mod:`dengine_cli.similarity`) proposes, for each candidate, earlier kept pages as
  references (within the VM when the policy does not share across VMs).  Every (page,
  reference) pair's patch is really produced and measured (batched).  Then, in scan order, a
  candidate takes the smallest patch (ties: the earliest reference) whose reference is still
  whole and whose size is below the patch threshold.  A page used as a reference by any chosen
  patch stays whole: it is never compressed.
* Every other candidate is compressed, really, and kept compressed only when the result is below
  the compression threshold.
* Footprint of a VM = whole pages * 4096 + patch bytes + compressed bytes - paged-out bytes (+
  under ``ksm`` the frames of the merged zero pages, charged to the first VM that has one, and
  the KSM pages beyond one per content that ``max_page_sharing`` makes, charged to the VM that
  keeps the content: :func:`~dengine_cli.engine.plan.choice.merged_frames`).  Per-page
  metadata (the hypervisor's records of where patches and compressed pages live) is not counted,
  as in the paper.  Savings = 1 - footprint / present bytes.

Sampling (``sample=f``): sharing stays exact; patching and compression are computed for a seeded
sample only and the saved bytes extrapolated.  The units sampled are the connected groups of
candidates linked by proposed (page, reference) pairs: within a group the decisions are exactly
those of the full plan, and groups do not influence each other (a reference outside the
candidates is whole whatever happens).  Groups of at least 1/f pages are always computed (a
stratum taken whole); the others are drawn in strata (VM, size class, whether a reference was
proposed), ``round(f N_h)`` groups of each (at least 2, and at least
:data:`~dengine_cli.engine.plan.sampling.MIN_SAMPLED` in all).  Saved bytes are estimated by the
stratified expansion estimator (unbiased; the VMs' figures add up to the total), with a 95%
interval from the normal approximation with finite-population correction (see
:mod:`~dengine_cli.engine.plan.sampling` for the design and why).  With ``f = 1`` every
group is computed and the plan is the exact one.
"""

from __future__ import annotations

from dengine_cli.engine.plan.choice import plan_dumps
from dengine_cli.engine.plan.model import ACTIONS, SCHEMA, HostFit, PagePlan, PlanReport, SampleInfo, VmPlan
from dengine_cli.engine.plan.planfile import write_plan

__all__ = [
    "ACTIONS",
    "SCHEMA",
    "HostFit",
    "PagePlan",
    "PlanReport",
    "SampleInfo",
    "VmPlan",
    "plan_dumps",
    "write_plan",
]
