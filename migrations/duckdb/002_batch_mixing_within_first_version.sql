-- Drift tracking schema, version 2 (atlas format 9): each batch's iLISI among version 1's cells
-- only, so batch mixing is compared with version 1's like for like when later batches have joined
-- (the neighbours of `ilisi_mean` include every later batch's cells). NULL in parts written
-- before it (an atlas upgraded to format 9 has it recomputed, migrations/layout/m0008).

ALTER TABLE batch_drift ADD COLUMN ilisi_first_version_mean DOUBLE;
