-- Drift tracking schema, version 1. Every table but schema_migrations has a `version` column
-- (the atlas model version the row belongs to); readers filter on version <= committed.

CREATE TABLE versions (
    version              INTEGER PRIMARY KEY,
    created_at           TIMESTAMP,
    strategy             VARCHAR,
    parameters           VARCHAR,   -- JSON object
    datasets             VARCHAR,   -- JSON list of the datasets in the atlas at this version (cumulative)
    n_cells              BIGINT,
    n_new_cells          BIGINT,
    train_seconds        DOUBLE,
    fisher_seconds       DOUBLE,
    fisher_mean          DOUBLE,
    fisher_max           DOUBLE,
    fisher_nonzero_share DOUBLE,
    extra                VARCHAR    -- JSON object of any further record fields
);

CREATE TABLE version_drift (
    version                     INTEGER NOT NULL,
    scope                       VARCHAR NOT NULL,   -- 'vs_previous' | 'vs_first'
    n_cells                     BIGINT,
    n_cells_knn                 BIGINT,
    n_labelled_knn              BIGINT,
    displacement_mean_raw       DOUBLE,
    displacement_median_raw     DOUBLE,
    displacement_mean_aligned   DOUBLE,
    displacement_median_aligned DOUBLE,
    knn_preservation_mean       DOUBLE,
    label_accuracy_current      DOUBLE,
    label_accuracy_compared     DOUBLE,
    ilisi_mean                  DOUBLE,
    ilisi_norm_mean             DOUBLE,
    PRIMARY KEY (version, scope)
);

CREATE TABLE celltype_drift (
    version                   INTEGER NOT NULL,
    scope                     VARCHAR NOT NULL,
    cell_type                 VARCHAR NOT NULL,
    n_cells                   BIGINT,
    n_cells_knn               BIGINT,
    centroid_shift_raw        DOUBLE,
    centroid_shift_aligned    DOUBLE,
    displacement_mean_aligned DOUBLE,
    knn_preservation_mean     DOUBLE,
    label_accuracy_current    DOUBLE,
    label_accuracy_compared   DOUBLE,
    PRIMARY KEY (version, scope, cell_type)
);

CREATE TABLE batch_drift (
    version                               INTEGER NOT NULL,
    batch                                 VARCHAR NOT NULL,
    n_cells                               BIGINT,
    n_cells_knn                           BIGINT,
    ilisi_mean                            DOUBLE,
    ilisi_norm_mean                       DOUBLE,
    displacement_aligned_vs_previous_mean DOUBLE,
    displacement_aligned_vs_first_mean    DOUBLE,
    PRIMARY KEY (version, batch)
);

CREATE TABLE cell_drift (
    version                          INTEGER NOT NULL,
    cell                             VARCHAR NOT NULL,
    displacement_aligned_vs_previous DOUBLE,
    displacement_aligned_vs_first    DOUBLE
);

CREATE TABLE drift_flags (
    version   INTEGER NOT NULL,
    scope     VARCHAR NOT NULL,
    cell_type VARCHAR,            -- NULL: the whole version
    measure   VARCHAR NOT NULL,
    value     DOUBLE,
    threshold DOUBLE
);

CREATE TABLE transfer_summary (
    version         INTEGER NOT NULL,
    dataset         VARCHAR NOT NULL,
    query_cell_type VARCHAR,       -- the query's own annotation ('(unlabelled)' for cells without one)
    assigned_label  VARCHAR,       -- label transferred from the reference ('Unknown' allowed)
    n_cells         BIGINT,
    share           DOUBLE         -- share of the query cell type's cells given assigned_label
);
