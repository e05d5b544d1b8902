"""Regenerate ``benchmarks/RESULTS.md`` (and ``benchmarks/figures/``) from the benchmarks' outputs.

    python -m benchmarks.results [--out DIR] [--keep]

Reads ``<out>/<name>.json`` and ``<out>/<name>.md`` of every benchmark (whichever exist), copies
their PNGs to ``benchmarks/figures/`` and writes the page: the machine, the command and wall time
of each benchmark, the method's checks (issue "Prove the method") and the speed and memory
targets with how far each is met or missed, and every table. ``--keep``: a benchmark not in
``<out>`` keeps what the current page says of it (its machine line, command row, check rows,
the targets table and its section), word for word, with the engine commit that line names;
without it, the page names the earlier commit whose page holds its figures.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
from pathlib import Path

import pandas as pd

from benchmarks import common as C

ORDER = ("mapping", "mapping_heldout", "lambda_sweep", "replay_sweep", "schedule_sweep", "anchor_sweep", "sequential", "sequential_heldout", "evidence", "evidence_scvi", "speed", "scale",
         "novelty", "novelty_finetune", "novelty_surgery", "novelty_anchor", "naming", "naming_heldout", "naming_pancreas",
         "naming_pancreas_heldout", "distributed",
         "streaming")
MAX_PNG = 200 * 1024

# Why a target is missed, written after reading the measurements (keyed by target id).
WHY = {
    "throughput": (
        "scvi-tools runs faster on this machine than the 4,600 cells/s quoted in the issue: 5,378, 6,118 and 6,368 "
        "cells/s in three idle runs at the same settings on 2026-11-27 and 9,653 on 2026-12-05 (the same scvi-tools "
        "1.4.2), so the same-run ratio moved between 1.5x and 2.0x while ours went from 10,000-11,500 to 14,100 "
        "cells/s (2.2-3.1x the quoted figure). Both models do the same work per cell "
        "(2000-gene NB likelihood, 2 x 128 encoder and decoder, batch 128); the engine evaluates the terms of the NB "
        "likelihood that vanish at zero counts on non-zero counts only and steps Adam with the fused kernel. What "
        "remains is the dense 2000-wide decoder, softmax and log(theta + mu), and Lightning's per-step overhead."
    ),
    "ewc_epoch": (
        "Structural, not the penalty. Surgery trains only the new batch rows, so it skips every weight gradient "
        "(including the 2000 x 128 gene layers of encoder and decoder): finetune, with no penalty and no replay, "
        "already costs 1.4-1.6x surgery per epoch (1.5x in the run on this page). The EWC penalty itself is cheap (one foreach autograd node, about "
        "1 ms a step), and replay adds n_query / (1 - 0.25) = 1.33x the cells per epoch. No full-weight method can be "
        "within 1.3x of surgery; against finetune, the full-weight baseline, ewc costs about 1.2-1.5x per epoch."
    ),
    "fisher": "",
    "knn": (
        "Only an approximate index can be 10x faster: the exact faiss index is brute force, no faster than sklearn's "
        "tree on 10-d data. The engine's IVF index (auto above 50k labelled cells; nlist 1024, nprobe 32) is built "
        "once per version and stored; a loaded machine slows it more than it slows sklearn."
    ),
    "memory": "",
}


# Observations written after reading the measurements (shown under the checks).
NOTES = [
    "A review of the benchmarks' verdicts (2026-12-07, stop 42; commit a85c305), each against the bar as issue 18 "
    "writes it. (1) Check 4 judged only the EWC penalty alone at lambda 100, the default before 2026-12-06; today's "
    "default runs on the same evidence scale beside the embedding anchor, and its drift grows from 1k to 10k cells "
    "on every seed of the stored run (0.074 to 0.100, 0.066 to 0.096, 0.063 to 0.096; mean 0.068, 0.097, 0.048 at "
    "100k, one seed), so the table of checks now has a row for it, MISSED. The anchor's weight is not scaled by "
    "the cells the atlas represents (only the EWC term is), which is where to look. (2) Parity is read one-sided, "
    "'within 0.02 (or above)': the issue asks that the engine's surgery 'reach' scvi-tools'; read two-sided "
    "('within 0.02' either way) kang would miss by AUROC, where the engine's surgery ranks the new monocytes "
    "better than scvi-tools' (+0.038 on seeds 0-2, +0.031 on seeds 6-8). Pancreas' known-accuracy gap, printed "
    "-1.00, is -1.004 points (166 known cells), beyond the bar: the check now prints three decimals. (3) The "
    "scvi-tools rows fit the negative binomial likelihood, the engine's, where scvi-tools' `SCVI` defaults to "
    "ZINB; the pages said 'its own defaults'. NB keeps the parity check a comparison of training on the same "
    "model; a probe (next notes) measures ZINB on pancreas. (4) The novelty sections train the reference 150 and the "
    "fold-in 100 epochs, where the atlas's own rule gives up to 400 / 200 at these sizes; issue 16's bar table "
    "is the default rule on that shorter training (its title now says so). (5) Check 3 judges the accuracy of "
    "known-type cells, stricter than the bar's 'all cells folded in' (a type the reference lacks is wrong under "
    "every method); the all-cells figures now stand beside it and give the same verdicts (kang 0.868 against "
    "finetune's 0.859; pancreas has no new type). (6) The sweeps' drift part took the mean of the seeds' ratios, "
    "check 2 the ratio of the mean drifts; now both the latter. On the anchor sweep's section the two differ by "
    "0.01 at most and no setting lies near 1/3 (largest 0.25), so no verdict there changes. Nothing else was "
    "found: AUROC orientation and ties, known accuracy (Unknown calls scored as their predicted label for every "
    "row), the Procrustes drift on version 1's cells in the same order for both libraries, leave-one-out on "
    "version 1's cells, gene selection on reference cells only, and paired seeds.",
    "scvi-tools' own likelihood, ZINB, on pancreas (a probe, not a section: `SCVI` with the scArches settings "
    "and gene_likelihood 'zinb' beside 'nb', reference and surgery at the mapping benchmark's settings, seeds 0-2, "
    "one process, one torch thread, 2026-12-07). The NB rows repeat the mapping section's scvi-tools surgery to the "
    "digit (AUROC 0.986, known accuracy 0.884). With ZINB scvi-tools' surgery gives AUROC 0.975 +- 0.026 and known "
    "accuracy 0.892 +- 0.006 (seeds: 0.898, 0.886, 0.892). Against it the engine's surgery (0.982 / 0.874) is "
    "within the AUROC bar (+0.007) and 1.8 points under on known accuracy, where against NB it is 1.0: with "
    "scvi-tools' true default, pancreas parity misses by more. The other three scenarios were not probed.",
    "Reruns of 2026-12-07 (stop 42, engine a275bd9, each the first run of its seeds after the strength count fix "
    "05062fc): the novelty sections (default fold-in, finetune, surgery), naming on seeds 0-2 and the README's "
    "pancreas naming example on seeds 0-4. They repeat the runs before within the seeds' spread. Default rule, "
    "known cells called / new cells caught: pancreas 0.8% / 95% (before 1.0% / 93%), pbmc 5.3% / 40% (4.6% / 41%), "
    "ifnb 5.6% / 53% (6.0% / 55%), kang 4.9% / 71% (4.4% / 67%), kang_half 2.9% / 29% (3.2% / 28%), pbmc_half "
    "8.9% / 10% (9.0% / 12%): issue 16's bar is still met on pancreas only. Kang naming: groups 94%, 88% and 95% "
    "FCGR3A+ monocytes with FCGR3A among the markers, then 50%, 54% and 59% of donor 1244's labelled with the name "
    "(mean 54%, as before; 68% with the type known from the start): issue 13's 80% is still missed. Pancreas naming: "
    "the default names the type on all five seeds (groups of 28-41 cells, 88-96% ductal; every smartseq2 ductal cell "
    "labelled), the penalty alone at lambda 100 on five, surgery on two, finetune and the anchor alone on one. The "
    "anchor's novelty section (its run before 05062fc) was not rerun: a shorter session kept the time for the "
    "reviews.",
    "Engine changes after every run on this page (2026-12-07, stop 42; reviews of the engine). (1) A short "
    "minibatch now replays reference cells in proportion to its query cells (commit 0a2e299): before, every "
    "minibatch got round(B r) replayed cells, so each epoch's last batch, and every batch of a query under one "
    "batch, replayed more than the share the EWC strength assumes (a 27-cell query 54% instead of 25%). At the "
    "sizes here only each epoch's last batch changes; the README's naming example at seed 0 gives a first group of "
    "36 cells, 34 ductal, where it gave 38 and 34, and names all 25 of smartseq2's ductal cells either way; the "
    "sections were not rerun. (2) The share of new cells' interval (`novel_share_interval`) is wider (commit "
    "f0e7557: it counts the cells over the averaging's neighbours and the calibration's spread); the novelty "
    "sections' `low` / `high` columns are those of the narrower interval, their point estimates unchanged. (3) The "
    "drift tables' 'vs version 1' scope now compares version 1's cells alone (commit 09b0861); the benchmarks "
    "measure drift on version 1's cells at version 2, where nothing changes.",
    "Held-out seeds (2026-12-07). Pages before this one called mapping seeds 3-5 held out, 'no default chosen on "
    "them'; but the rule that made today's default (commits 0ac389e, 91c243c; the anchor notes below) scored "
    "exactly those seeds, so no mapping figure of the default was free of its choice (found by a review of the "
    "benchmarks). Seeds 0-5 are now named as the seeds defaults were chosen on (benchmarks.common.SELECTION_SEEDS), "
    "and the held-out section below is a new run on seeds 6-8 (engine commit 80b3156, after the strength fix of "
    "05062fc, so at lambda 1 by today's count; its seed line was corrected by hand from the wording of that commit, "
    "'defaults chosen on seeds 0-2', to the one the code now writes). The seeds 3-5 section is on the page of "
    "commit 80b3156 (`git show 80b3156:benchmarks/RESULTS.md`). On seeds 6-8 check 2 is met on pbmc (AUROC 0.601 "
    "against surgery 0.572, finetune 0.552, CLCVAE 0.596; finetune's sd 0.153) and missed on the other three by its "
    "AUROC part, as on seeds 0-2 and 3-5: kang 0.779 against finetune's 0.826 (CLCVAE 0.631, surgery 0.656), ifnb "
    "0.819 against CLCVAE's 0.831 (surgery 0.781, finetune 0.685), pancreas 0.917 against surgery's 0.943, "
    "finetune's 0.939 and CLCVAE's 0.925 (sds 0.014-0.037). Its known-accuracy part is met on all four (-0.4 to "
    "+0.9 points against surgery) and so is its drift part (0.07 / 0.13 / 0.16 / 0.16 of finetune's on ifnb / "
    "pbmc / kang / pancreas). The anchor alone (2b) meets pbmc and misses kang by 0.013 (0.813 against 0.826), "
    "where on seeds 0-2 and 3-5 it met kang. Parity (check 1) holds on kang and pbmc and misses on pancreas by "
    "AUROC (0.943 against scvi-tools' 0.976, bar 0.02) and on ifnb by 0.001 AUROC beyond the bar and 3.8 points of "
    "known accuracy (0.738 against 0.776), as on seeds 0-2. Nothing was chosen on these seeds before the run, and "
    "nothing was changed after it.",
    "Sequential fold-ins on held-out seeds 6-8 (2026-12-07, engine 4a1a1a0; both sequences, 71.8 min, with "
    "scvi-tools' surgery, fine-tuning and the paper's CLCVAE run through the same sequences for the first time). "
    "The engine's pancreas rows repeat those of the first held-out run (engine 97a3665, pancreas only) to the "
    "digit, apart from timings. Kang, five donors: check 3 is met, by the default (0.924 of the known-type cells folded in labelled "
    "against finetune's 0.908, leave-one-out accuracy unchanged, drift 0.18 of finetune's) and by both other ewc "
    "settings, as on seeds 0-2. Pancreas, four technologies into an indrop-only reference: missed by the accuracy "
    "part alone (0.662 against finetune's 0.681, bar 0.671; surgery 0.689; drift 0.09 of finetune's; "
    "leave-one-out -0.7 points); the anchor alone labels 0.670, the penalty alone at lambda 100 0.706 at 0.37 of "
    "finetune's drift (bar 1/3). On seeds 0-2 the default labelled 0.650 against finetune's 0.711. The paper's "
    "CLCVAE, held to the same bar against scvi-tools' own fine-tuning (check '3p', for comparison; the target of "
    "its two rows was reworded by hand to name scvi-tools' finetune, as the code writes it since f9d94fd): on kang it "
    "meets it (0.927 against 0.907, drift 0.22 of that finetune's, leave-one-out +0.2 points); on pancreas it "
    "misses all three parts (0.629 against 0.655, drift 0.38, leave-one-out -1.3 points). So the one sequence "
    "where our default misses check 3 is one where the paper's method misses it by more, and labels fewer cells "
    "than the engine's default (0.629 against 0.662, each with its own model and the same kNN). scvi-tools' "
    "surgery moves pancreas' reference a little (drift 0.055), as it moves ifnb's: a one-batch reference model "
    "has no batch input, and load_query_data adds a randomly initialised column for that batch (the note on "
    "scvi-tools' 'frozen' surgery).",
    "Kang naming on held-out seeds 6-8 (2026-12-07, `python -m benchmarks.naming --first-seed 6`, engine "
    "1a65d0b; the naming section on seeds 0-2 took part in choosing the default, by the rule of "
    "91c243c; the section's title was given '(held-out seeds)' by hand, as the code now writes it). Issue 13's bar is missed in both parts at the default. The purest Unknown group of donor 1488 is "
    "76%, 96% and 98% FCGR3A+ monocytes (89, 70 and 64 cells, FCGR3A among the top 10 markers each time): seed 6 "
    "misses the 80% part, which seeds 0-2 met (87-92%). After naming it, 55%, 43% and 54% of donor 1244's 56 "
    "FCGR3A+ monocytes are labelled with the name (mean 51%, against 54% on seeds 0-2); the vote gives it to 57-61% "
    "and the Unknown rule takes 1, 10 and 2 of those cells back. The other fold-ins label fewer (finetune 37%, the anchor "
    "alone 34%, surgery 4%, the penalty alone at lambda 100 2%). With the type in the reference from the start the "
    "atlas labels 66-70% (mean 68%), so a type named from one donor's few dozen cells reaches 51/68 = 75% of what the "
    "atlas reaches when it knew the type all along (83% on seeds 0-2).",
    "The README's pancreas naming example on held-out seeds 6-10 (2026-12-07, `python -m benchmarks.naming_pancreas "
    "--first-seed 6`, engine 1a65d0b; seeds 0-4 took part in choosing the default): the default names the type as "
    "the README says on three seeds of five (first groups of 38, 33 and 23 cells, 92%, 91% and 83% ductal; then "
    "100%, 100% and 96% of smartseq2's 25 ductal cells labelled ductal, 0-4% of its other cells). On seeds 8 and 9 "
    "it calls none of celseq's 100 cells Unknown, so there is no group; the rule calibrated against the reference "
    "alone, finetune and the anchor alone form no group there either, surgery names it on seed 8 and not 9. A probe "
    "of seed 8 (two torch threads, default ewc): the ductal cells' combined novelty statistic averages 6.2 against "
    "4.3 for known cells (novelty AUROC 0.85, kNN uncertainty 0.68), but the cut that lets 5% of the reference's own "
    "leave-one-out cells through is 9.6, and the query-shift correction found a shift of 0.57; no cell passes it. "
    "Surgery names it on three of five, the penalty alone at lambda 100 on two, finetune and the anchor alone on "
    "one. With the ductal cells in the reference from the start, 44-92% of smartseq2's are labelled ductal (mean "
    "78%). The run of seeds 5-9 in the note above (before the strength count fix of 05062fc) named it on four of "
    "five, with seed 8 among the four.",
    "The paper's CLCVAE with reference replay (2026-12-07, a probe, not a section: `scvi_job(..., replay=True)` "
    "of benchmarks.mapping, the rows `--clcvae-replay` adds, on the held-out seeds 6-8 of pancreas, pbmc and ifnb, "
    "one torch thread; kang not run for time). The paper's text speaks of presenting the query model with examples "
    "from the reference, its notebooks and the CLCVAE rows on this page replay nothing, and the engine's ewc replays "
    "a quarter of every minibatch, so a review asked whether the comparison favours ours. With a quarter of its "
    "training cells drawn from the reference, CLCVAE's novel AUROC / known accuracy / drift as a share of "
    "scvi-tools' finetune become: pancreas 0.927 / 0.892 / 0.39 (without replay 0.925 / 0.892 / 0.33), pbmc 0.607 / "
    "0.949 / 0.24 (0.596 / 0.948 / 0.26), ifnb 0.832 / 0.756 / 0.24 (0.831 / 0.762 / 0.12). The probe's other rows "
    "repeat the section's to the digit. Replay moves the paper's AUROC by 0.001-0.011, within its sd (0.013-0.053), "
    "and lets its reference move more on pancreas and ifnb. Against this CLCVAE the default's pbmc AUROC (0.601) "
    "would be 0.006 short, so check 2 on pbmc, the one scenario it meets on these seeds, holds against the paper's "
    "notebooks but not against the paper's text; the other verdicts do not change.",
    "The sections on this page ran on 2026-12-04/05/06/07 on this 2-core machine, mostly two jobs at a time of one "
    "torch thread each, while other work shared the machine (load averages above): seconds are not comparable "
    "between rows. Engine defaults: replay_fraction 0.25, scvi-tools' epoch rule, and ewc as it was when the "
    "section ran. The default fold-in changed on 2026-12-06 (by the rule in the note on the anchor with lambda 1 "
    "below) from the EWC penalty alone at lambda 100 on the evidence scale to lambda 1 beside the embedding anchor "
    "at 1000. Run after the change, so 'ewc' is today's default in them: both mapping sections (seeds 0-2 and "
    "the held-out seeds 6-8), the sequential fold-ins, both naming sections, 'EWC against atlas size' (which names each setting) and the first "
    "'Novelty rules side by side'; there the old default is the row 'ewc (lambda 100, no anchor)' (checks 2c and "
    "3c). Every other section ran before the change: in them 'ewc' and 'the default' are the penalty alone at "
    "lambda 100, and today's default is the row 'ewc (anchor + lambda 1)' where a run has it. "
    "The strength sweep ran before the default was set to 100 and sweeps it explicitly. The mapping runs and the "
    "sequential run of 2026-12-06 also fold every query in with the embedding anchor in place of the EWC "
    "penalty, 'ewc (anchor)' (checks 2b and 3b).",
    "The EWC strength's count of query cells (2026-12-07, commit 05062fc, after every run on this page but the held-out mapping section): the "
    "evidence scale divides by the query cells that train, where it divided by all the query's cells, the 10% "
    "held out for validation included; at the same ewc_lambda the EWC term is now 1/0.9 of what these runs used, "
    "which ran at lambda 0.9 by today's count (the anchor's weight is unchanged). Its size, measured on this "
    "machine with the mapping benchmark's default fold-in and scoring (a probe, not a section: one torch thread, the "
    "engine at 05062fc with lambda 0.9 against 1; novel AUROC / known accuracy / drift): pancreas seeds 0-2, "
    "mean 0.949 / 0.876 / 0.126 against 0.950 / 0.880 / 0.131; seed 0 of pbmc 0.584 / 0.956 / 0.050 against "
    "0.578 / 0.961 / 0.068, of kang 0.759 / 0.960 / 0.102 against 0.747 / 0.960 / 0.108, of ifnb 0.809 / 0.739 / "
    "0.063 against 0.809 / 0.740 / 0.068. Every difference is within the seeds' spread of the mapping sections "
    "(kang's AUROC sd 0.013, pbmc's drift moves as much between seeds), and none turns a verdict of checks 2 "
    "and 3 by its own size; the sections were not rerun. The same commit keeps the penalty where 2-cell "
    "minibatches replay 2 cells beside 1 query cell (it fell to 0), a setting no run here uses.",
    "The anchor and the default (2026-12-06). A rule written before those two runs (commit 0ac389e): the anchor "
    "becomes the default only if, in mapping on seeds 3-5 (then called held out) and in sequential on seeds 0-2, it meets every "
    "part of checks 2 and 3 that the default meets, and more parts in total. Parts met (check 2: AUROC, known "
    "accuracy, drift on four scenarios; check 3: leave-one-out accuracy, accuracy, drift on two): the anchor 14 of "
    "18, the default 9, and none the default meets was lost. Check 2 is met by the anchor on kang (AUROC 0.813 "
    "against surgery 0.653, finetune 0.797, CLCVAE 0.638) and pbmc (0.629 against 0.572, 0.628, 0.613; finetune's "
    "sd 0.107, so that margin is noise-sized) and missed on pancreas (0.942 against surgery 0.958 and CLCVAE "
    "0.965) and ifnb (0.807 against CLCVAE 0.825; known accuracy 2.0 points under surgery's). Check 3 is met on "
    "kang (accuracy 0.909 against finetune 0.915, drift 0.20 of finetune's) and missed on pancreas by its accuracy "
    "part (0.665 against finetune 0.711; drift 0.09 of finetune's and leave-one-out within 0.7 points, both met, "
    "where the default missed all three). The anchor's engine rows repeat the anchor grid's (a separate run of the "
    "same seeds) to the third digit. The condition was necessary, not sufficient, and the switch was held back: "
    "with the anchor made the default (working tree of 2026-12-06, not committed) the test that runs the README's "
    "naming example as written failed. Its first Unknown group held 16 cells instead of 38 and the next query "
    "(smartseq2) had 28% of its ductal cells named, against all of them with the EWC default; at the tests' tiny "
    "settings the anchor named 14, 19 and 25 of smartseq2's 25 ductal cells on seeds 0-2 against 22, 24 and 25. "
    "Holding only the replayed cells lets the encoder put a query's cells in a region of their own: that finds new "
    "types, and it also lets a small, just-named type's next cells land apart from it. The rule covered checks 2 "
    "and 3, not naming. On kang's naming benchmark (run after, 2026-12-06; the naming note) the anchor names "
    "better than every other fold-in (42% of donor 1244's FCGR3A+ monocytes labelled with the name, mean of "
    "three seeds, against the default's 14%), so on naming the anchor wins on kang and loses on the README's "
    "pancreas example: a default that keeps both is the next step.",
    "The anchor with a weak EWC penalty beside it, 'ewc (anchor + lambda 1)' (benchmarks.common.ANCHOR_EWC; "
    "measured first as check 2c of a held-out mapping run of 2026-12-06, whose other rows repeat the previous "
    "held-out run's to the digit; this note is written as of then, so 'the default' in it is the penalty alone at "
    "lambda 100. The held-out section on this page is a later run with it as the default, at commit 6ce51ad, and "
    "repeats that run to the digit: every AUROC, known accuracy and drift of its 96 rows, 288 values, with the old "
    "default under 'ewc (lambda 100, no anchor)'). "
    "It was tried because neither the anchor nor the default names on both examples. On the README's pancreas "
    "example (its section below, rerun with it; the other rows repeat the previous run's to the digit) the first "
    "Unknown group is 86-94% ductal (35-42 cells) and all of smartseq2's ductal cells are labelled ductal on every "
    "seed of 0-4: 5 seeds meet both parts of the README's claim, against 3 for the default (a fourth has every "
    "ductal cell labelled from a first group 77% ductal) and 1 for the anchor alone; 0-2.7% of smartseq2's other "
    "cells are labelled ductal (the default 5-11%). In a probe beforehand lambda 3 and 10 beside the anchor met it "
    "on 4 of 5 (seed 1's group 78% and 77% ductal). On kang (a probe of the naming benchmark's workflow with this "
    "fold-in only, seeds 0-2; the page's kang naming section, rerun with it, repeats these to the digit) donor 1488's purest Unknown group "
    "was 90%, 87% and 92% FCGR3A+ monocytes (68-75 cells, FCGR3A among the markers each time) and 43%, 59% and 61% "
    "of donor 1244's were then labelled with the name: mean 54%, against the default's 14%, the anchor's 42% and "
    "finetune's 36%, near the 64-66% an atlas that knew the type reaches and still short of issue 13's 80%. In the "
    "held-out mapping run it sits between the default and the anchor: kang AUROC 0.768 (default 0.659, anchor "
    "0.813, finetune 0.797, so check 2 is missed there), pbmc 0.630 (met, as with the anchor), ifnb 0.814 (CLCVAE "
    "0.825; known accuracy 1.9 points under surgery's), pancreas 0.935 (surgery 0.958); drift 0.07-0.16 of "
    "finetune's. Parts of check 2 met: 8 of 12 (the default 6, the anchor 9), every part the default meets among "
    "them. Check 3 (the sequential section, rerun with it on 2026-12-06, seeds 0-2; its other rows repeat the "
    "previous run's to the digit): on pancreas leave-one-out accuracy +0.7 points (met), accuracy 0.650 against "
    "finetune's 0.711 (missed) and drift 0.10 of finetune's (met), where the default meets none of the three; on "
    "kang all three met, as with the default (leave-one-out +0.2 points, accuracy 0.920 against finetune's 0.915 "
    "and the default's 0.919, drift 0.19 of finetune's against the default's 0.11). The rule of the commit that "
    "added it (91c243c, written before the runs) asks four things, and each holds: checks 2 and 3 together, 13 "
    "parts of 18 against the default's 9, every part the default meets among them; the README's type named on 5 "
    "seeds of 5 against 3; donor 1244's FCGR3A+ monocytes labelled with their name 54% against 14% (kang naming "
    "section, mean of seeds 0-2). So it becomes the default (the commit after this page). What it costs: the "
    "default's kang AUROC in mapping was 0.659 and is now 0.768 (finetune 0.797); on pancreas 0.946 becomes 0.935; "
    "the kang sequence holds the reference less (drift 0.19 of finetune's against 0.11) at the same accuracy.",
    "Held-out seeds, first run (`mapping --first-seed 3`, seeds 3-5, run 2026-12-05 at commit 80b52a0, when "
    "'ewc' was the penalty alone at lambda 100; a second run on 2026-12-06 added the anchor rows and its engine "
    "rows differ a little from the first's as the packages were resolved anew; the section below is a third run, "
    "with today's default, which repeats the second to the digit; no default of the engine "
    "was chosen on these seeds): check 2 is missed on all four scenarios again, and its drift part is met on all four (ewc "
    "0.30 / 0.13 / 0.22 / 0.12 of finetune's drift on pancreas / kang / pbmc / ifnb), so holding the reference does "
    "not rest on the seeds the default was picked on. The AUROC orderings move with the seeds: on pbmc ewc now "
    "finds the new types better than finetune (0.623 vs 0.611; on seeds 0-2, in the run before the default changed, 0.529 vs 0.618) but not than CLCVAE "
    "(0.632 +- 0.102); on ifnb it beats surgery and finetune (0.798 vs 0.754, 0.770) but not CLCVAE (0.820) and "
    "its known accuracy is 1.9 points under surgery's; on kang it trails finetune (0.659 vs 0.785) and on pancreas "
    "every method is within 0.012 of the others but scvi-tools' surgery. Parity (check 1) moves too: pancreas's "
    "known accuracy is 1.41 points above scvi-tools' (1.00 under on seeds 0-2 in the run before the default changed) while its AUROC is 0.024 under "
    "(bar 0.02); ifnb misses by 0.030 AUROC and 1.16 points. Several gaps are within one seed sd (kang surgery's "
    "AUROC sd is 0.149 here), so three seeds settle the drift part and the kang AUROC gap, not the small ones.",
    "Check 2 on seeds 0-2 (the mapping section, rerun 2026-12-07 at commit 80d4fa2, the first run of these seeds "
    "after the strength count fix of 05062fc; the run before, at commit 4a7965f, is on benchmarks/RESULTS.md of "
    "commit 80d4fa2 and gave the same verdicts): missed on all four scenarios by its AUROC part. ewc's AUROC is "
    "under CLCVAE's on ifnb by 0.009 (0.806 against 0.815), under surgery's on pancreas by 0.032 (0.950 against "
    "0.982), under finetune's on pbmc by 0.039 (0.579 against 0.618; CLCVAE 0.612) and on kang by 0.034 (0.755 "
    "against 0.789). Its known-accuracy and drift parts are met on all four (drift 0.15 / 0.13 / 0.10 / 0.06 of "
    "finetune's on pancreas / kang / pbmc / ifnb). The old default in the same run ('ewc (lambda 100, no anchor)', "
    "check 2c) misses the same four AUROC parts: against it kang's AUROC rises from 0.610 to 0.755 and pbmc's from "
    "0.518 to 0.579, pancreas' falls from 0.955 to 0.950 and ifnb's stays (0.808, 0.806); the drift falls on "
    "pancreas (0.26 to 0.15 of finetune's), pbmc (0.18 to 0.10) and ifnb (0.12 to 0.06) and rises a little on kang "
    "(0.11 to 0.13). The anchor alone (check 2b) meets every part on kang (AUROC 0.814) and misses the AUROC part on "
    "the other three. On seeds 3-5 the default met check 2 on pbmc (0.630 against finetune's 0.628); here it misses "
    "it by 0.039, and finetune's sd over seeds (0.042 here, 0.107 there) is about as large as either margin. "
    "Where the AUROC is lost: on kang the weak EWC penalty holds some of the encoder weights the new monocytes "
    "need (the anchor alone finds them better, as the strength sweep found for the penalty: kang 0.75 at lambda 1, "
    "0.62 at 100); on pancreas the two frozen references find the ductal cells best of every method (the "
    "engine's surgery 0.982, scvi-tools' 0.986), so a fold-in that moves the encoder at all gives some of that up. Two cautions on "
    "reading check 2 (from a review of the benchmarks): ewc alone among the methods sees reference cells while it "
    "folds a query in (a quarter of every minibatch replayed, and the anchor holds exactly those cells), which is "
    "part of how it holds the reference; and the anchor's strength was tried on seed 0 of kang, pancreas and pbmc "
    "(the anchor note), so these seeds are not held out for it; nor are seeds 3-5, which scored the rule that "
    "made it the default (the held-out run is seeds 6-8). Drift is "
    "measured in each model's own latent space, so engine and scvi-tools drifts compare as ratios to their own "
    "finetune: ewc 0.15 / 0.13 / 0.10 / 0.06 of the engine's finetune, CLCVAE 0.33 / 0.11 / 0.30 / 0.11 of "
    "scvi-tools' (pancreas / kang / pbmc / ifnb): the default holds the reference a little less well than the "
    "paper's method on kang and two to three times as well on the other three.",
    "Holding the embedding instead of the weights (`lambda_sweep --grid anchor --first-seed 3`, seeds 3-5, run "
    "2026-12-05 evening, section below; written before the default changed, so 'ewc' and 'the default' in this note "
    "are the penalty alone at lambda 100). A seed-0 probe asked why ewc finds kang's new "
    "monocytes no better than surgery: with the EWC penalty off and the replayed reference cells' embeddings held "
    "instead (ContinualConfig.embedding_anchor, 1000; the strengths 100 and 1000 were tried on seed 0 of kang, "
    "pancreas and pbmc), the AUROC rose from 0.62 to 0.80 at the same drift, and adding the anchor to the default "
    "EWC did not (0.64). On the held-out seeds the anchor alone finds kang's FCGR3A+ monocytes better than every "
    "baseline (AUROC 0.813 against ewc 0.659, finetune 0.797, surgery 0.653) at ewc's drift (0.12 of finetune's), "
    "and on the other three scenarios it holds the reference about twice as well as ewc (0.10 / 0.11 / 0.06 of "
    "finetune's drift against 0.25 / 0.23 / 0.13 on pancreas / pbmc / ifnb) at an AUROC within the seeds' spread of "
    "ewc's (0.942 / 0.629 / 0.807 against 0.946 / 0.621 / 0.799). Check 2's three parts against surgery and "
    "finetune are met on kang and pbmc (pbmc by 0.001 AUROC over finetune, whose sd is 0.107) and missed on "
    "pancreas (surgery's AUROC 0.958) and ifnb (known accuracy 2.0 points under surgery's); the default ewc meets "
    "them on none of the four here. The paper's CLCVAE is not in this grid (the held-out mapping section: 0.638 on "
    "kang, 0.613 on pbmc). So the parameter penalty, not holding the reference as such, is what keeps new cells beside "
    "known ones: EWC holds every weight the reference's ELBO is sensitive to, including those a new type needs, "
    "while the anchor holds only what the reference cells' embeddings depend on. The anchor alone did not become "
    "the default; the anchor with lambda 1 beside it did (the notes on the anchor and the default, above).",
    "What replay does (`lambda_sweep --grid replay`, 3 seeds, run 2026-12-05; its surgery, finetune and default "
    "rows repeated the figures of the mapping run of seeds 0-2 then, at commit 4159f88, to the last digit): replay keeps the model explaining the reference "
    "cells, not the cells' places in the embedding. Alone (lambda 0), half of every minibatch replayed, it finds the "
    "new types best of every setting on kang (AUROC 0.800 vs finetune 0.789) and pbmc (0.689 vs 0.618), but moves the reference "
    "0.69 and 0.88 of finetune's drift. At lambda 100, no replay / a quarter (the default) / half: worst-scenario "
    "drift 0.43 / 0.28 / 0.40 of finetune's, mean AUROC 0.728 / 0.729 / 0.734 (the penalty is scaled by the query's "
    "share of a minibatch, 1 - r, and an epoch holds n_query / (1 - r) cells, so more replay means a weaker penalty "
    "over more steps). On pbmc and kang half replay lifts the AUROC-drift curve (pbmc at lambda 10: 0.603 at 0.38 of "
    "finetune's drift, against 0.560 at 0.60 without replay); on ifnb and pancreas it does not. Where the half-replay "
    "curve crosses a third of finetune's drift (linear between the grid's points) it stays under finetune's AUROC on "
    "pbmc (about 0.59 against 0.618) and far under on kang (about 0.67 against 0.789); the strength sweep's rule, "
    "applied to this grid, picks the default again.",
    "Parity (check 1) on seeds 0-2 (the mapping run of 2026-12-07 at commit 80d4fa2): met on kang and pbmc "
    "(AUROC 0.018 under, bar 0.02), missed on pancreas by 0.004 point beyond the bar of known accuracy (0.873 "
    "against 0.884, 1.004 points under: 1.7 of 166 known cells a seed; AUROC 0.004 under) and on ifnb by its known "
    "accuracy. The run before it (commit 4a7965f) met pancreas (0.40 under) and missed pbmc by 0.021 AUROC; the "
    "one before that (commit 4159f88, another environment) met pbmc and missed pancreas by 1.00 point: at these "
    "margins the verdict moves between runs. On ifnb known_accuracy scores the best label of every known cell (an "
    "Unknown call is not counted as wrong), and the engine's surgery gets it for 0.730 against scvi-tools' 0.766; "
    "counting Unknown calls as wrong (known_accuracy_called) the engine is ahead, 0.540 vs 0.526, as scvi-tools "
    "calls 42% of known cells Unknown against the engine's 36%. Two "
    "differences between the two surgeries were found, and close neither gap. scvi-tools' query train() warms the "
    "KL term up again (weight 0 to 0.5 over the 200 query epochs) where the engine's query starts at 1: with "
    "scvi-tools' schedule (`lambda_sweep --grid schedule`, pancreas, pbmc, ifnb, 3 seeds; section below) the "
    "engine's surgery scores 0.738 on ifnb (0.730 without) and 0.873 on pancreas (unchanged), its ewc 0.764 on ifnb "
    "(0.746) and 0.873 on pancreas (0.878); no known accuracy or AUROC moves by 2 points, so the engine keeps its "
    "schedule. And ifnb's reference has one batch, which scvi-tools leaves out of its model (a one-level covariate "
    "is ignored), so its query model gains two random batch columns and encodes the reference through the "
    "untrained one. A third difference is in the measure, not the models (found by a review of the benchmarks): "
    "both libraries' rows label through one transfer (scArches' kernel, k = 50, Unknown above 0.3), whose weights "
    "exp(-d sigma^2 / 4) are not free of the latent's scale (a latent c times larger raises the exponent c^3-fold), "
    "so the same neighbours give another uncertainty in a latent of another scale (the two latents' scales were not "
    "compared here; finetune's drift, in each library's own units, is 0.97-1.11 times the engine's in the mapping "
    "run). So a cross-library AUROC comparison (parity, and ewc against CLCVAE in check 2) carries the kernel's scale as "
    "well as the models; a comparison within one library does not. Where ifnb's known-accuracy gap comes from, "
    "reference or fold-in (a probe of 2026-12-07, not a section: seeds 0-2 of ifnb at the mapping benchmark's "
    "settings, one torch thread, engine e0ead9b; scvi-tools' reference imported into the engine by "
    "`Atlas.from_scvi`, whose embeddings equal scvi-tools' to 1e-4, then folded in by the engine's surgery; the "
    "same transfer for every row): the engine's reference and surgery 0.730 (0.736, 0.737, 0.716, the mapping "
    "section's mean and sd to the digit); scvi-tools' reference with the engine's surgery 0.757 (0.773, 0.763, 0.734); "
    "scvi-tools' reference and surgery 0.787 (0.798, 0.798, 0.765; the mapping section's run of the same seeds "
    "gave 0.766 +- 0.026: scvi-tools' rows, seeded alike, do not repeat to 0.02 from one process to another here). About half "
    "of the gap is the reference the engine trains (same architecture, epochs and optimiser; the two differ in "
    "initialisation and scvi-tools' weight decay of 1e-6) and half is the fold-in. scvi-tools' query KL warm-up "
    "closes about 1 point of the fold-in's half (the engine's surgery with a query KL warm-up of 400 epochs: "
    "0.766 on scvi-tools' reference, 0.738 on its own). The AUROC is alike in every row (0.786-0.791). "
    "The gap is mostly the FCGR3A+ monocytes, 289 of the 980 known cells (one point is 10 cells): labelled right "
    "at 0.38, 0.41 and 0.36 on seeds 0-2 by the engine, 0.44, 0.43 and 0.37 by scvi-tools' reference with the "
    "engine's surgery, and 0.58, 0.57 and 0.49 by scvi-tools (the 53 CD8 T cells move both ways between seeds). "
    "What remains of the fold-in's half after the warm-up (about 2 points) was not traced to a setting.",
    "Sequential (check 3; rerun 2026-12-07 at commit e0ead9b, the first run of seeds 0-2 after the strength count "
    "fix of 05062fc and the first with scvi-tools' surgery, fine-tuning and the paper's CLCVAE beside the engine on "
    "these seeds; the run before, at commit 9d78012, is on benchmarks/RESULTS.md of commit e0ead9b and gave the "
    "same verdicts; this run's wall time is long because other work shared the two cores): met on kang, missed on "
    "pancreas by its accuracy part. Over kang's five donors the default labels 0.922 of the known-type cells "
    "folded in (finetune 0.912, surgery 0.919, the paper's CLCVAE 0.922 against scvi-tools finetune's 0.911) with "
    "drift 0.19 of finetune's (CLCVAE 0.24 of its library's). After four technologies folded "
    "into an indrop-only reference the default labels 0.653 of the cells against finetune's 0.703 (surgery 0.672, "
    "the anchor alone 0.658, the penalty alone at lambda 100 0.647; scvi-tools surgery 0.639, finetune 0.611, "
    "CLCVAE 0.618), with its drift 0.09 of finetune's and the reference's leave-one-out accuracy 0.3 points under "
    "version 1's (both parts met; the penalty alone meets leave-one-out and misses drift, 0.36; CLCVAE, against "
    "scvi-tools' finetune, meets accuracy and misses leave-one-out, -2.3 points, and drift, 0.35). The run before (9d78012): 0.650 against finetune's 0.711. The reference is indrop's 100 cells of this 500-cell set: it explains little of the next "
    "technology, so holding it costs accuracy, and every fold-in that holds it misses the accuracy part. A probe "
    "(seeds 0-2 of this sequence, not in the table) asked whether holding every earlier version's cells is the "
    "cost, since an early fold-in's placement is then kept for good: with the anchor holding only version 1's "
    "cells (indrop) and cells folded in later free to move, the default labelled 0.636 (0.575, 0.665, 0.667) at "
    "0.12 of finetune's drift, no better. Over kang's five donors the drift of the default and of the anchor alone "
    "grows step by step (0.14 and 0.12 of finetune's after the first donor, 0.19 and 0.19 after the last), as each "
    "version anchors the next where it put the reference, not where version 1 did; the penalty alone ends at "
    "0.11.",
    "Evidence (check 4) is met (run of 2026-12-07 at commit a029200, `--jobs 2 --seeds-largest 1`, the first run "
    "after the strength count fix of 05062fc and with the generation seeded, so its references are the cells the "
    "scvi-tools section below was given): with the evidence-scaled penalty alone (lambda 100, no anchor) the drift "
    "falls as the atlas grows (0.172, 0.062, 0.022 at 1k, 10k, 100k generated cells; 0.18, 0.10 and 0.03 of "
    "finetune's; the two runs before, of other cells: 0.142, 0.064, 0.026 and 0.146, 0.069, 0.021) while the fixed "
    "scale keeps it near 0.33-0.43 (0.46, 0.50 and 0.53 of finetune's) whatever the size. The other side of the "
    "same figure: at 10k and 100k cells that penalty finds the new monocytes about as well as surgery (AUROC 0.607 "
    "/ 0.661 vs surgery 0.624 / 0.661; finetune 0.791 / 0.797), because a reference that counts as 100,000 cells "
    "barely lets 2,030 query cells move it. Today's default (lambda 1 beside the embedding anchor, whose weight "
    "does not depend on the atlas's size) moves the reference 0.068, 0.097 and 0.048 (0.07, 0.15 and 0.08 of "
    "finetune's): below the penalty alone at 1k, above it at 10k and 100k, and not falling with size; its AUROC is "
    "0.718, 0.699 and 0.662 (the penalty alone 0.526, 0.607, 0.661; surgery 0.471, 0.624, 0.661). At 100k, where "
    "the engine's index is approximate (IVF) by default, the default, the penalty alone and surgery rank the new "
    "cells alike. Check 4 is about the penalty's scale and holds for it; the default's drift stays between 0.05 "
    "and 0.10 at every size. The 100k point is one seed (a 100k reference trains for 15 minutes here).",
    "scvi-tools' 'frozen' surgery still moves the ifnb reference slightly (drift 0.037): its reference model of "
    "one batch has no batch input, and load_query_data adds a randomly initialised column for that batch that no "
    "query cell trains (before any query training the reference cells' coordinates already differ by 0.031 on "
    "average, mean absolute change, seed 0). The engine's surgery keeps the reference bit-identical.",
    "Novelty (issue 16; rerun 2026-12-06 with today's default fold-in, lambda 1 beside the embedding anchor, "
    "first at commit 4a7965f, then with the rows `distance_only` and `learned_weights` added by c4f5a1f: every "
    "other row of the second run repeats the first to the digit, and the section is the second): the default rule meets the bar "
    "(at most 7% of known cells called, at least 80% of new cells caught) on pancreas only (1.0% called, 93% caught; "
    "seed 2 caught 79%). Elsewhere no threshold on the same score could: `best@7%` (the most new cells any cut catches "
    "with at most 7% of known cells called) is 0.53 (pbmc), 0.55 (ifnb), 0.71 (kang), 0.49 (kang_half) and 0.10 "
    "(pbmc_half). Against the run before the default changed (commit 6622610, the penalty alone at lambda 100; "
    "benchmarks/RESULTS.md of commit 4a7965f) the new default ranks kang's new monocytes better (best@7% 0.71 against "
    "0.57, caught 67% against 40%), and pbmc (0.53 against 0.41), kang_half (0.49 against 0.24) and ifnb (0.55 "
    "against 0.58, within the seeds' spread) move less or not at all; pbmc_half gets worse (AUROC 0.56 against 0.63, "
    "9.0% of known cells called, over the 7% bar). The ranking, so the embedding, is still the limit: after the "
    "fold-in the new types sit beside known ones. Two cautions (from a review "
    "of the benchmarks): conformal p-values cannot fall below 1/(n+1), so the combined score has a ceiling and cells "
    "tie at it; a cut calls all tied cells or none, so where more than 7% of known cells tie at the top best@7% "
    "counts the tied new cells as missed (an earlier run's pancreas seed 1, novelty_m30: best@7% 0 while the rule "
    "caught every new cell calling 15.7% of known ones; the same holds for `novelty_or_composition`, whose score is "
    "its p-value). And this benchmark trains at 150 reference / 100 query epochs, not the engine's 400 / 200 (the "
    "kang fold-in's kNN-uncertainty AUROC is 0.710 here against 0.755 in the mapping run of seeds 0-2). Averaging "
    "each signal over ten neighbours of the same batch more than doubled the new cells caught against the "
    "unaveraged score (the default before) at the same target (pbmc 15% -> 41%, kang 46% -> 67%, kang_half 12% -> "
    "28%), for about as many false alarms on pbmc (4.5% -> 4.6%). Averaging over 30 ranks better on pbmc, ifnb, "
    "kang and kang_half (best@7% 0.66, 0.59, 0.75, 0.56) and still misses the bar on each. The share of new cells "
    "the engine reports is a lower bound (the share the rule finds); Storey's estimate, measured beside it, reads "
    "0.00 on pancreas and pbmc (true 0.17 and 0.10), whose known query cells sit closer to the reference than the "
    "reference's own cells do. Beside the rules, the same held-out types known: a reference of the same batches "
    "with them labelled, the same query folded in at the default. There the held-out types' kNN probability ranks them "
    "with best@7% 0.99 (pbmc), 0.91 (kang), 0.98 (kang_half) and 0.94 (pbmc_half): the data and the model tell "
    "these types apart once they are known, so on those four scenarios the bar is missed because a fold-in that "
    "does not know them places them beside known types, not because the data cannot separate them. On ifnb the "
    "stimulated dendritic cells are ranked at best@7% 0.71 even when known, and only 26% of them get their own "
    "label: the 80% bar there is above what the same atlas gets with the type in it. The finetune, surgery and "
    "anchor notes below compare with the ewc run of 2026-12-05 (benchmarks/RESULTS.md of commit 55ed0e8, another "
    "environment), made with the penalty alone at lambda 100, the default then.",
    "Which signal holds the novelty score back. A probe first (seed 0 of the six novelty scenarios at the "
    "benchmark's settings, today's default fold-in, each signal averaged over ten cells of the batch as the engine "
    "does, ranked alone; AUROC / best@7%): the distance to the 10 nearest reference cells alone ranks pbmc's and "
    "kang's new cells better than the default's combination with the kNN uncertainty (pbmc 0.947 / 0.74 against "
    "0.882 / 0.57; kang 0.957 / 0.78 against 0.919 / 0.72), as the uncertainty alone barely ranks them (pbmc 0.54, "
    "kang 0.76): NK and CD16 monocytes sit confidently beside one known type. On pancreas the reverse holds: the "
    "uncertainty alone ranks the ductal cells perfectly and the distance alone poorly (0.832 / 0.00 without a "
    "tiebreak), and on ifnb and kang_half the combination ranks best. Taking the smaller of the two p-values instead "
    "of Fisher's combination (Tippett) changed no best@7% by more than 0.03. The section then measures two "
    "combinations beside the engine's rules on three seeds (same run, rows `distance_only` and `learned_weights`, "
    "called as the default rule is: the query's shift taken off, the threshold from the calibration cells). "
    "`learned_weights` weighs the two -log p-values by what tells the reference's own types apart (each held out "
    "in turn and scored against the others; a logistic regression with balanced classes): best@7% is at least the "
    "default's on all six (pbmc 0.66 against 0.53, pbmc_half 0.15 against 0.10, kang 0.73 against 0.71, kang_half "
    "0.50 against 0.49, ifnb 0.56 against 0.55, pancreas 1.00 both) and the AUROC rises on pbmc (0.929 against "
    "0.867) and kang (0.940 against 0.921) and falls on ifnb (0.808 against 0.850) and kang_half (0.862 against "
    "0.897). At the 5% target it is not a better rule: it catches pbmc's new cells better (52% against 41%) but "
    "pancreas' ductal cells on two seeds of three (60% against 93%; on seed 0 the weights put the distance first "
    "and the shift correction then calls no cell), and calls 10.2% of pbmc_half's known cells. The distance alone "
    "ranks kang best (best@7% 0.76) and calls no pancreas cell at all. Neither reaches the bar anywhere the default "
    "misses it, so the default stays; weights learned per atlas help the ranking where the uncertainty is "
    "uninformative (pbmc), and calling with them needs its own calibration before it could become a rule.",
    "A rule that reads the neighbourhood's mix of query and reference cells (`composition` in the section, "
    "measured in the benchmark only, not in the engine; the figures of this note are from its first run, 2026-12-06 "
    "at commit 6622610 with the fold-in then, the penalty alone at lambda 100; in the section's rerun with today's "
    "default it calls 1.6% of kang_half's known cells and catches 79% of its new ones, best@7% 0.94, just under the "
    "bar, and calls 39% of kang's known cells). Issue 16 asks for a rule "
    "that tells a query shifted as a whole from one with many new cells, and a new type forms neighbourhoods of "
    "query cells only. The score: the log-odds of the share of query cells among a cell's 50 nearest atlas cells "
    "against the query's share of all cells, averaged over ten neighbours; the null: the reference cells' own share "
    "of reference neighbours in the same graph. On kang_half it is the only rule that meets the bar: 2.1% of known "
    "cells called, 81% of new cells caught, AUROC 0.963 and best@7% 0.94 (the default: 6.7%, 22%, 0.871, 0.24); "
    "with the default rule beside it (`novelty_or_composition`, each at half the target) 4.6% and 84%. Everywhere "
    "else it fails: on kang it calls 49% of known cells, on pancreas 44%, on pbmc_half 18%, and on pbmc and ifnb it "
    "ranks new cells no better than chance (AUROC 0.53 and 0.45). The cause, from the per-type figures of a probe on "
    "kang seed 0 at the same settings, scored apart: CD4 T cells are 58% of donor 1488 against 41% of the reference "
    "donors; mixed evenly with the reference's they would make 39% of their neighbourhoods, and they make 62%, so 82% "
    "of them are called. Its 101 FCGR3A+ monocytes, the new type, make 47% of theirs (the query is 31% of the "
    "atlas; 50% on kang_half, where 1% of them are called): after the ewc fold-in they sit among reference cells. A "
    "type the query holds more of, and mixes a little less well, looks new to a count of neighbours, and a new type "
    "placed among known cells does not. On kang_half the new CD4 T cells are most of the query and no reference cell "
    "sits among them, "
    "which is the one case the count tells apart. The composition rule is not adopted.",
    "Novelty on a finetune fold-in (`python -m benchmarks.novelty --strategy finetune`, same references and "
    "seeds, run 2026-12-05): with no penalty holding the reference, the default rule's AUROC rises from 0.82 to "
    "0.93 on pbmc, from 0.90 to 0.93 on kang and from 0.87 to 0.97 on kang_half, and best@7% from 0.37 to 0.75 "
    "(pbmc), 0.58 to 0.76 (kang) and 0.24 to 0.89 (kang_half, where the ranking now allows the bar). At its "
    "5% target the rule catches 71% (pbmc) and 77% (kang) of the new cells for 7.1% and 7.8% of known cells "
    "called: close to the bar, still short of it. On kang_half the query-shift correction takes the half of the "
    "query that is new for a shift and catches 23% (0.4% of known cells called); calibrated against the "
    "reference alone it catches 95% but calls 12% of known cells, as a finetune fold-in moves the known cells "
    "too. ifnb and pbmc_half do not gain. So on pbmc and kang most of issue 16's miss is the EWC penalty, which "
    "holds the new types beside known ones: the same trade-off as check 2 of 'Prove the method'.",
    "Novelty on a surgery fold-in (`--strategy surgery`, same references and seeds, run 2026-12-05): the frozen "
    "reference finds fewer new cells than ewc by the same rule on pbmc (AUROC 0.73 against 0.82; 6% caught "
    "against 43%), ifnb (0.79 against 0.87; 14% against 44%) and pbmc_half (0.51 against 0.62), and as many on "
    "kang (0.894 against 0.896), kang_half and pancreas. By the atlas's own Unknown rule, folding in with ewc "
    "finds what the reference cannot explain better than freezing it, and finetune better than either on pbmc "
    "and kang.",
    "Novelty on an anchor fold-in (`python -m benchmarks.novelty --strategy anchor`, seeds 0-2, 150 / 100 epochs, "
    "run 2026-12-05 evening; ewc with the embedding anchor in place of the EWC penalty). Against an ewc run made at "
    "the same time in the same environment (`python -m benchmarks.novelty`, not the section on this page, whose "
    "figures it repeats within the seeds' spread), the default rule catches more of kang's new monocytes (70% "
    "against 40%; best@7% 0.74 against 0.57) and of ifnb's dendritic cells (54% against 42%; best@7% 0.55 against "
    "0.58), as many on pbmc (44% against 43%; best@7% 0.51 against 0.41) and kang_half (23% against 22%; best@7% "
    "0.50 against 0.24), fewer on pancreas (95% against 100%) and pbmc_half (11% against 14%), calling at most 7% "
    "of known cells except on pbmc_half (7.5%). Issue 16's bar is still met on pancreas only: holding the embedding "
    "instead of the weights moves kang towards what an atlas that knew the type gets (best@7% 0.91), not all the way.",
    "The README's naming example over seeds (`python -m benchmarks.naming_pancreas`, seeds 0-4, rerun 2026-12-06 "
    "after the default changed, engine as at commit 9d78012: every fold-in's rows repeat the previous run's to the "
    "digit, where today's default was the row 'ewc (anchor + lambda 1)'; the rows calibrated on the reference and "
    "the type-known rows are new, run on today's default). At the engine's defaults, epochs included, one torch "
    "thread per run, the default names the type as the README says on all five seeds: a first group of 35-42 "
    "cells, 86-94% ductal, then every one of smartseq2's 25 ductal cells labelled ductal, with 0-2.7% of its other "
    "cells. The penalty alone at lambda 100 (the default before) does so on three seeds (seed 1's group is 77% "
    "ductal; seed 2 calls 17% of celseq's ductal cells Unknown), surgery on three, the anchor alone on one and "
    "finetune on none (it calls 18% of the ductal cells Unknown, mean): on this example leaving the encoder free "
    "finds the new type less often, the reverse of kang. The test of the example runs seed 0 with torch's default "
    "threads: a first group of 38 cells, 34 ductal, and all 25 of smartseq2's ductal cells predicted ductal. "
    "Seeds 0-4 took part in choosing the default (the rule of commit 91c243c), so the same lines were run on "
    "seeds 5-9 (`--first-seed 5`, the same commit, figures in this note only): the default names the type on four "
    "seeds of five (groups of 38-41 cells, 88-92% ductal, every ductal cell of smartseq2 labelled, 1-5% of its "
    "other cells), and on seed 9 it calls none of celseq's ductal cells Unknown, so there is no group to name "
    "(no other fold-in calls any of them either); the penalty alone names it on three (mean labelled 73%), surgery "
    "on four, the anchor alone on three, finetune on none. With the Unknown rule calibrated against the reference "
    "alone (`novelty_calibration=\"reference\"`) the default names it on four seeds of five of each set. With the "
    "ductal cells in the reference from the start, smartseq2's are labelled ductal at 92-96% (seeds 0-4) and "
    "72-100% (seeds 5-9). The query-shift bound (at most the second-largest label's difference, commit 674b1a9) "
    "was designed on seed 3 for the default of then; its history is in benchmarks/RESULTS.md of commit 4a7965f.",
    "The query-shift bound on the novelty benchmark (`python -m benchmarks.novelty --jobs 2`, seeds 0-2, run on "
    "2026-12-06 at commit 674b1a9 and at its parent 50417c0 in the same environment): the default rule's figures are the same on every scenario "
    "but pbmc, where known cells called go from 7.6% to 7.7% at the same 42.9% of new cells caught. Those two runs "
    "(known called / new caught): pancreas 1.8% / 100%, pbmc 7.7% / 43%, ifnb 4.7% / 42%, kang 4.1% / 40%, kang_half "
    "6.7% / 22%, pbmc_half 6.2% / 14%; the page's section, a third run at commit 6622610 in the same environment, "
    "repeats them to the digit. The section before it (run 2026-12-05, commit d096945, another environment): 1.4% / "
    "94%, 8.2% / 43%, 4.2% / 44%, 4.0% / 39%, 6.7% / 23%, 5.1% / 13%: the environment moves these more than the bound "
    "does. Issue 16's bar stays met on pancreas only.",
    "Naming (issue 13, kang; rerun 2026-12-06 after the default changed, at commit 6b282e0, engine code as at 9d78012: every fold-in's rows "
    "repeat the previous run's to the digit, where today's default was the row 'ewc (anchor + lambda 1)' and 'ewc' "
    "the penalty alone at lambda 100; the type-known rows are new, folded in with today's default). Donor 1488's "
    "purest Unknown group was 90%, 87% and 92% FCGR3A+ monocytes (68, 75 and 74 cells) with FCGR3A among its ten "
    "markers each time (by gene symbol): the group part of issue 13's bar is met. After naming it, 43%, 59% and 61% "
    "of donor 1244's 56 FCGR3A+ monocytes were labelled with the name (mean 54%; the anchor alone 42%, finetune "
    "36%, the penalty alone at lambda 100 14%, surgery 6%): the labelling part (80%) is missed. The ceiling, "
    "measured three ways: with the type in the reference from the start (donors 1015 + 1256 with their 321 "
    "FCGR3A+ monocytes labelled, then 1488 and 1244 folded in with today's default) the atlas labels 68%, 64% and "
    "64% of 1244's as such (with the penalty alone, the run before: 66%, 64%, 64%); the same vote in a PCA of the "
    "counts, no model, 66%; and a supervised classifier (logistic regression on all 1,287 genes, trained on every "
    "labelled reference cell) 79% (44 of 56), with 95% of the other cells right. (That run scaled the counts by "
    "the mean and sd of all eight donors, donor 1244 included; scaled by the reference donors' alone, as the "
    "benchmark does since 2026-12-07, the same two give 68% (38 of 56) and 79% (44 of 56, 95% of the other cells "
    "right), computed by `expression_ceiling()` on its own.) So a type named from one donor's "
    "few dozen cells reaches 54 / 65 = 83% of what the atlas reaches when it had the type all along, and on these "
    "annotations the bar is above what neighbour label transfer reaches at all. Between the name and that "
    "ceiling, the vote loses most: the atlas's 50-neighbour vote gives 58% of them the name (mean over seeds; "
    "the nearest labelled cell 60%; a vote divided by each type's size 71% and the nearest type centroid 71%, but "
    "with 81% and 86% of 1244's other cells right against the vote's 94%), and the Unknown rule takes a few "
    "points more (52%, 61%, 62% named; 43%, 59%, 61% labelled). Finetune calls 75-78% of 1488's FCGR3A+ monocytes "
    "Unknown (the default 64-69%), and on its seed 2 HDBSCAN split them into two groups, the purer 48% FCGR3A+. "
    "None of the other votes is in the engine. Nor does a classifier on the embedding do better than the vote "
    "(a probe of seeds 0-2, the benchmark's settings, not in the table: multinomial logistic regression on the "
    "latent of every labelled cell of the final atlas): after naming it gives the name to 54%, 61% and 64% of "
    "1244's FCGR3A+ monocytes (the vote 52%, 61% and 62%), 64-70% with balanced class weights but with 87-88% of "
    "the other cells right against 94-95%; with the type known from the start 75%, 73% and 71% (the vote 71%, 68% "
    "and 68%), 80-84% with balanced weights at 85-87% of the other cells right. The embedding holds about what the "
    "vote reads: a type learnt from one donor's 70 "
    "cells is where the labelled share is lost, not the vote. These fold-ins' rows moved once with the environment: the seed-0 "
    "fold-in of commit a677e9d, rerun in the freshly installed environment of 2026-12-05 (torch pinned, the other "
    "packages resolved anew), called 37% of 1488's FCGR3A+ monocytes Unknown against 47% before, which shows how "
    "much a result resting on a few dozen cells moves with it.",
    "Distributed (issue 17, pancreas): two CPU processes reach one process's known-type accuracy within 0.4 points "
    "(AnnData in memory, processes forked) and 1.0 point (the same data read backed, processes spawned and reading "
    "the cell store in 128-cell blocks) on the mean of 3 seeds, with the same epochs. A first version gave each "
    "process whole minibatches, which halved the optimiser steps per epoch: -2.0 points and a third more drift; "
    "each process now takes its share of every minibatch. On this 2-core machine two processes are slower than one "
    "(gloo's all-reduce on a small model; a spawned process also starts a fresh interpreter, about 8 s a training "
    "here, and every process reads every block); the point of the run is that the result is the same.",
    "Streaming (issue 17): the run on this page has 8 seeds (0-7) of all three scenarios, every streamed mean "
    "within one in-memory sd. An earlier 3-seed run (RESULTS.md of commit 511be5f) had 7 of 9 within: pancreas "
    "AUROC (-0.002 against an sd of 0.001) and ifnb AUROC (-0.026 against 0.014) were not. In 128-cell blocks of "
    "single-cell chunks the streamed epoch is a uniformly random order of the cells, the same distribution as the "
    "in-memory shuffle (only the draws differ), and three seeds understated the in-memory spread (ifnb AUROC sd "
    "0.014 at 3 seeds, 0.054 at 8); after that miss the seeds were raised to 8 for every scenario, and this run was "
    "made with them. The largest difference here is pancreas drift, 0.388 streamed against 0.352 +- 0.054. An "
    "earlier form of the streamed shuffle, blocks of consecutive stored cells, did differ: on pancreas (stored one "
    "technology after another) every minibatch came from one technology and the drift rose to 0.36 from 0.32; "
    "blocks are now put together from chunks taken all over the data, as tiledbsoma-ml does.",
    "The paper's CLCVAE against atlas size (`python -m benchmarks.evidence --library scvi`, 2026-12-07, engine "
    "commit 73d78bd; issue 18 asks for the paper's method in every table). scvi-tools trains its own reference on "
    "each generated atlas and folds the real kang donor 1488 in by its surgery, finetune and the paper's CLCVAE "
    "(lambda 1e4). The references are the cells of 'EWC against atlas size' (rerun at commit a029200): both runs "
    "generate them with the same code and seeds, seeded since 73d78bd (a test checks that the same seed gives the "
    "same counts; that the two runs' cells are equal was not compared file by file). Drift is in each model's own "
    "latent space, so it is compared as a share of that library's finetune. CLCVAE moves the reference 0.24 ± "
    "0.10, 0.13 ± 0.01 and 0.20 (one seed) of scvi-tools finetune's drift at 1k, 10k and 100k cells. The 100k row "
    "is not trained like the others: scvi-tools' default reference run is min(400, 400 x 20000 / cells) = 80 "
    "epochs there, while its KL warm-up stays at 400 epochs, so that reference ends at KL weight 0.2 (the engine "
    "warms up over the whole run at every size), and the paper's Fisher is taken at KL weight 1. So this run shows "
    "the share falling from 1k to 10k and says nothing firm beyond. A probe (not a section: seed 0, 100k cells "
    "generated by the same recipe and seed from a generator retrained the same way, scvi-tools' reference with "
    "`plan_kwargs={'n_epochs_kl_warmup': 80}`, its warm-up over the whole run, two torch threads, engine e98af58) "
    "gives CLCVAE drift 0.116, 0.13 of finetune's 0.919, with AUROC 0.604 against surgery's 0.606 and finetune's "
    "0.775: from 10k to 100k the paper's share stays at 0.13 where the engine's evidence-scaled penalty alone goes "
    "from 0.10 to 0.03. The engine's own fixed-scale rows hold 0.46, 0.50 and 0.53 of its finetune's drift. "
    "CLCVAE's novel AUROC is 0.487, 0.675 and 0.545 against scvi-tools surgery's 0.491, 0.683 and 0.545, within the "
    "seeds' spread (sd 0.05-0.10): on these references lambda 1e4 makes the fold-in find the new monocytes no "
    "better than freezing the reference, while it still moves it. scvi-tools' rows label by an exact neighbour "
    "search; the engine's section uses its default, an approximate (IVF) index above 50,000 labelled cells, so at "
    "100k the two also search differently. In the engine's section the default moves its reference 0.07, 0.15 "
    "and 0.08 of the engine's finetune drift, with AUROC 0.718, 0.699 and 0.662; the evidence-scaled penalty alone "
    "(lambda 100) 0.18, 0.10 and 0.03, with AUROC 0.526, 0.607 and 0.661. As a share of finetune's drift the "
    "engine's default holds its reference closer than the paper's method holds scvi-tools' at 1k and 100k (0.07 "
    "and 0.08 against 0.24 and 0.20; 0.13 in the 100k probe) and a little less close at 10k (0.15 against 0.13); "
    "it ranks more of the new cells above the known ones at 1k and 100k (0.718 against 0.487, 0.662 against "
    "0.545; 0.604 in the probe) and about as many at 10k (0.699 ± 0.040 against 0.675 ± 0.051). The two "
    "surgeries, the frozen ends, differ too: the engine's AUROC 0.471, 0.624 and 0.661 against scvi-tools' 0.491, "
    "0.683 and 0.545.",
    "Scale (issue 17; memory in binary units, 1 GiB = 2**30 bytes, as VmHWM counts it; 4 GiB = 4.29 decimal GB): "
    "the 3M-cell backed create meets the 4 GiB bar by 0.12 GiB (3.88 GiB = 4.17 decimal GB, so a decimal 4 GB bar "
    "would be missed); a re-run at the final commit of 2026-12-05 peaked at 3.85 GiB (create) and 3.70 GiB (the 10k ingest; 3.98 decimal GB). About 1 GiB of its 3.88 was "
    "there before the call (0.57 GB interpreter and torch, 0.45 GB the backed AnnData's obs). Before two fixes of "
    "this session it peaked at 4.23 GB: checksums computed over whole matrices, and 65,536-cell training blocks "
    "read in one query (now 100,000 rows and 8,192 cells at a time). Peaks are VmHWM from /proc; earlier pages "
    "used getrusage's ru_maxrss, which Linux carries across exec, so a step could show its parent's peak (the "
    "benchmark process after generating the data).",
]


def previous_page(name: str) -> str | None:
    """Return the commit (short hash and date) of the last committed ``RESULTS.md`` with ``name``'s full figures.

    A page holds them when its commands table has a full (not quick) row for ``name``; a page
    that did not re-run it only points further back.
    """
    import subprocess

    def git(*args: str) -> str | None:
        done = subprocess.run(["git", *args], cwd=C.BENCH_DIR, capture_output=True, text=True)
        return done.stdout if done.returncode == 0 else None

    try:
        log = git("log", "--format=%h|%ad", "--date=short", "--", "RESULTS.md") or ""
    except OSError:
        return None
    for line in log.split():
        commit, date = line.split("|")
        page = git("show", f"{commit}:./RESULTS.md") or ""  # (a commit that deleted the page has none)
        if re.search(rf"^\| {re.escape(name)} \| `.*\| full \|", page, flags=re.M):
            return f"{commit} ({date})"
    return None


def kept_parts(page: str) -> dict[str, dict[str, object]]:
    """Return what a generated RESULTS.md says of each benchmark: machine line, command row, check rows, section.

    The page's sections follow its command table's order, one each; the targets table is kept
    under the key ``"targets"`` of the benchmarks it comes from (``speed``, ``scale``).
    """
    commands = re.findall(r"^\| (\w+) \| `.*$", page.split("## The method's checks")[0], flags=re.M)
    names = [n for n in commands if n in ORDER]
    head, _, rest = page.partition("\n## Notes\n")
    blocks = re.split(r"\n(?=## )", rest)[1:]  # the notes' block ends at the first section
    if len(blocks) != len(names):
        raise SystemExit(f"the current page has {len(blocks)} sections for {len(names)} benchmarks: cannot keep them")
    parts: dict[str, dict[str, object]] = {}
    for name, block in zip(names, blocks, strict=True):
        parts[name] = {
            "machine": next((ln for ln in head.splitlines() if ln.startswith(f"- {name}: ")), None),
            "command": next((ln for ln in head.splitlines() if ln.startswith(f"| {name} | `")), None),
            "checks": [ln for ln in head.split("## The method's checks")[-1].split("\n## ")[0].splitlines()
                       if ln.startswith(f"| {name} | ")],
            "section": block.rstrip(),
        }
    targets = re.search(r"\n## Speed and memory targets\n(.*?)(?=\n## )", head + "\n## ", flags=re.S)
    for name in ("speed", "scale"):
        if name in parts and targets:
            parts[name]["targets"] = targets.group(1).strip()
    return parts


def load(out: Path) -> dict[str, tuple[dict, str]]:
    found = {}
    for name in ORDER:
        j, m = out / f"{name}.json", out / f"{name}.md"
        if j.exists() and m.exists():
            found[name] = (json.loads(j.read_text()), m.read_text())
    return found


def copy_figures(out: Path) -> list[str]:
    C.FIGURES.mkdir(exist_ok=True)
    copied = []
    for png in sorted(out.glob("*.png")):
        if png.stat().st_size > MAX_PNG:
            print(f"WARNING: {png} is {png.stat().st_size // 1024} KB (> 200 KB); not copied")
            continue
        shutil.copy2(png, C.FIGURES / png.name)
        copied.append(png.name)
    return copied


def _v(x) -> float:
    return float("nan") if x is None else float(x)


def verdict(value: float, target: float, higher_is_better: bool, unit: str = "") -> str:
    if math.isnan(value):
        return "not measured"
    ok = value >= target if higher_is_better else value <= target
    if ok:
        return "met"
    if higher_is_better:
        return f"MISSED: {value:,.2f}{unit} vs >= {target:,g}{unit} ({value / target:.0%} of the target)"
    return f"MISSED: {value:.2f}{unit} vs <= {target:g}{unit} ({value / target:.1f}x the limit)"


def targets(found: dict) -> list[str]:
    rows = []
    if "speed" in found:
        s = found["speed"][0]
        r = s.get("ratios", {})
        ours = _v(r.get("ours_reference_cells_per_second"))
        ratio = _v(r.get("throughput_ratio_ours_over_scvi"))
        rows.append(("throughput", "training throughput >= 2x scvi-tools (aim 10,000 cells/s)",
                     f"ours {ours:,.0f} cells/s, scvi-tools {_v(r.get('scvi_reference_cells_per_second')):,.0f} cells/s, "
                     f"ratio {ratio:.2f}", f"{verdict(ratio, 2.0, True, 'x')}; 10,000 cells/s: {verdict(ours, 10_000, True)}"))
        e = _v(r.get("ewc_over_surgery_per_epoch"))
        rows.append(("ewc_epoch", "EWC + replay <= 1.3x our surgery per epoch", f"{e:.2f}x", verdict(e, 1.3, False, "x")))
        f = _v(r.get("fisher_over_epoch_10k"))
        fi = s.get("fisher", {})
        rows.append(("fisher", "per-cell Fisher over 10k cells <= one training epoch",
                     f"{_v(fi.get('seconds_per_10k_cells')):.1f} s vs {_v(fi.get('epoch_seconds_per_10k_cells')):.1f} s "
                     f"(ratio {f:.2f})", verdict(f, 1.0, False, "x")))
        knn = [k for k in s.get("knn", []) if k["n_reference"] == 100_000]
        if knn:
            by = {k["method"]: k for k in knn}
            best = max((k for k in knn if k["method"].startswith("atlasengine") and k["labels_equal_exact"] >= 0.99),
                       key=lambda k: k["speedup_vs_sklearn"], default=None)
            txt = "; ".join(f"{m}: {k['transfer_seconds']:.2f} s per call (build {k['build_seconds']:.2f} s), "
                            f"{k['labels_equal_exact']:.2%} equal" for m, k in by.items())
            sp = _v(best["speedup_vs_sklearn"]) if best else float("nan")
            quoted = 6.8 / best["transfer_seconds"] if best else float("nan")
            rows.append(("knn", "transfer_labels 10k x 100k >= 10x faster than sklearn NearestNeighbors, >= 99% labels "
                         "equal to exact", txt + (f"; best >= 99%-equal: {best['method']}, {sp:.1f}x sklearn (fit + query) "
                         f"of the same run per call ({_v(best.get('speedup_incl_build')):.1f}x counting the one-off index "
                         f"build), {quoted:.1f}x the 6.8 s quoted for sklearn in the issue" if best else ""),
                         f"vs sklearn in the same run: {verdict(sp, 10.0, True, 'x')}; vs the quoted 6.8 s: "
                         f"{verdict(quoted, 10.0, True, 'x')}"))
        else:
            rows.append(("knn", "transfer_labels 10k x 100k >= 10x faster than sklearn", "100k not run (quick mode)", "not measured"))
    if "scale" in found:
        recs = found["scale"][0]["records"]
        for step, what in (("create", "create from a backed h5ad"), ("ingest", "ingest of 10k cells")):
            done = [r for r in recs if r.get("step") == step and r.get("peak_rss_mb") is not None
                    and (step == "ingest" or r.get("input") == "backed")]
            if not done:
                continue
            big = max(done, key=lambda r: r["n_cells"])
            gb = big["peak_rss_mb"] / 1024
            rows.append(("memory", f"{what} with a 3M-cell atlas (~500 non-zeros per cell) under 4 GiB peak",
                         f"{gb:.2f} GiB peak RSS at {big['n_cells']:,} atlas cells ({big['seconds']:.0f} s)",
                         verdict(gb, 4.0, False, " GiB") + ("" if big["n_cells"] >= 3_000_000 else " (3M not run)")))
    lines = ["| target | measured | verdict | why |", "|---|---|---|---|"]
    for key, target, measured, v in rows:
        lines.append(f"| {target} | {measured} | {v} | {WHY.get(key, '') if 'MISSED' in v else ''} |")
    return lines


def method_checks(found: dict) -> list[str]:
    """List the checks of the issue 'Prove the method', as the benchmarks computed them."""
    lines = ["| benchmark | scenario | check | measured | target | verdict |", "|---|---|---|---|---|---|"]
    for name in ("mapping", "mapping_heldout"):
        for c in found.get(name, ({}, ""))[0].get("checks", []):
            lines.append(f"| {name} | {c['scenario']} | {c['check']} | {c['measured']} | {c['target']} | "
                         f"{'met' if c['met'] else 'MISSED'} |")
    for name in ("sequential", "sequential_heldout"):
        for c in found.get(name, ({}, ""))[0].get("checks", []):
            lines.append(f"| {name} | {c['scenario']} | {c.get('check', '3. after the last step')} | {c['measured']} | "
                         f"{c['target']} | {'met' if c['met'] else 'MISSED'} |")
    if "evidence" in found:  # judged from the run's records by today's rule (every evidence-scale setting)
        from benchmarks.evidence import drift_growth

        for c in drift_growth(pd.DataFrame(found["evidence"][0]["records"])):
            lines.append(f"| evidence | kang (generated references) | 4. drift against atlas size, {c['setting']} | "
                         f"mean drift by size {c['measured']} | does not grow with size | "
                         f"{'met' if c['met'] else 'MISSED'} |")
    return lines if len(lines) > 2 else []


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=C.DEFAULT_OUT)
    p.add_argument("--keep", action="store_true", help="keep the current page's text of benchmarks not in --out")
    args = p.parse_args()
    found = load(args.out)
    if not found:
        raise SystemExit(f"no benchmark outputs in {args.out}; run the benchmarks first")
    page = C.BENCH_DIR / "RESULTS.md"
    kept = {n: v for n, v in kept_parts(page.read_text()).items() if n not in found} if args.keep and page.exists() else {}
    names = [n for n in ORDER if n in found or n in kept]
    copy_figures(args.out)
    env = next(iter(found.values()))[0]["env"]
    lines = [
        "# Benchmark results",
        "",
        "Generated by `python -m benchmarks.results` from the outputs of the benchmarks below; do not edit by hand.",
        "",
        "## Machine",
        "",
        f"- platform: `{env['platform']}`, Python {env['python']}, {env['cpu_count']} CPUs, torch {env['torch']} "
        f"({env['torch_threads']} thread{'' if env['torch_threads'] == 1 else 's'}), faiss {env.get('faiss')}, scikit-learn {env.get('sklearn')}",
    ]
    for name in names:
        if name in kept:
            lines += [kept[name]["machine"]] if kept[name]["machine"] else []
            continue
        e = found[name][0]["env"]
        lines.append(f"- {name}: scvi-tools {e.get('scvi') or 'not installed'}, scib-metrics {e.get('scib_metrics') or 'not installed'}, "
                     f"engine commit {e.get('engine_commit_at_start') or 'not recorded'} (at end {e.get('engine_commit_at_end') or 'not recorded'}), "
                     f"torch threads {e.get('torch_threads')}, load average at end {e.get('load_average_at_end', e.get('load_average_at_start'))}")
    lines += ["", "## Commands", "", "| benchmark | command | mode | wall time |", "|---|---|---|---|"]
    for name in names:
        if name in kept:
            lines += [kept[name]["command"]] if kept[name]["command"] else []
            continue
        js = found[name][0]
        lines.append(f"| {name} | `{js['command']}` (venv `{Path(js['env']['executable']).parents[1].name}`) | "
                     f"{'QUICK' if js.get('quick') else 'full'} | {js.get('wall_seconds', float('nan')) / 60:.1f} min |")
    missing = [n for n in ORDER if n not in found and n not in kept]
    if missing:
        where = [f"{n}: commit {found_in}" if (found_in := previous_page(n)) else f"{n}: no committed page"
                 for n in missing]
        lines += ["", f"Not re-run for this page: {', '.join(missing)}. Their last figures are in earlier pages "
                  f"of `benchmarks/RESULTS.md` ({'; '.join(where)}; `git show <commit>:benchmarks/RESULTS.md`), "
                  "measured at the engine state those pages name."]
    checks = method_checks(found)
    kept_checks = [row for n in names if n in kept for row in kept[n]["checks"]]
    if kept_checks and not checks:
        checks = ["| benchmark | scenario | check | measured | target | verdict |", "|---|---|---|---|---|---|"]
    lines += ["", "## The method's checks", "", *checks, *kept_checks]
    if "speed" in found or "scale" in found:
        lines += ["", "## Speed and memory targets", "", *targets(found)]
    elif any("targets" in kept.get(n, {}) for n in ("speed", "scale")):
        lines += ["", "## Speed and memory targets", "", next(kept[n]["targets"] for n in ("speed", "scale")
                                                               if "targets" in kept.get(n, {}))]
    lines += ["", "## Notes", "", *[f"- {n}" for n in NOTES], ""]
    for name in names:
        if name in kept:
            lines += [str(kept[name]["section"]), ""]
            continue
        js, md = found[name]
        md = re.sub(r"^## ", "### ", md, flags=re.M)
        md = re.sub(r"^# ", "## ", md, flags=re.M)
        md = re.sub(r"\]\(([\w.-]+\.png)\)", r"](figures/\1)", md)
        lines += [md.rstrip(), ""]
    (C.BENCH_DIR / "RESULTS.md").write_text("\n".join(lines))
    print(f"wrote {C.BENCH_DIR / 'RESULTS.md'}")


if __name__ == "__main__":
    main()
