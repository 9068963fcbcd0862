# Step 1: theta0, the initial weights of an (architecture, seed), written once and reused by
# the pre-training and by every distillation run of that student. One rule for classifiers
# and detectors: the dataset's task (kcd.data.DATASETS) chooses the engine.


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule init:
    output:
        L.theta0("{ds}", "{arch}", "{seed}"),
    log:
        log_path("{ds}", "init", "{arch}-s{seed}"),
    resources:
        launch=lambda w: launch("init", f"init-{w.ds}-{w.arch}-s{w.seed}", w.ds),
    params:
        spec=lambda w: json.dumps(P.init_spec(w.ds, w.arch, w.seed)),  # a classifier or detector
    shell:
        "{resources.launch} init --spec {params.spec:q} -q > {log:q} 2>&1"
