# Step 1: theta0, the initial weights of an (architecture, seed), written once and reused by
# the pre-training and by every distillation run of that student.


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule init:
    output:
        L.theta0("{ds}", "{arch}", "{seed}"),
    wildcard_constraints:
        ds=CLASSIFICATION_DATASETS,
    log:
        log_path("{ds}", "init", "{arch}-s{seed}"),
    resources:
        launch=lambda w: launch("init", f"init-{w.ds}-{w.arch}-s{w.seed}", w.ds),
    params:
        classes=lambda w: config["datasets"][w.ds]["num_classes"],
    shell:
        "{resources.launch} init --arch {wildcards.arch} --seed {wildcards.seed} "
        "--num-classes {params.classes} --out {output:q} -q > {log:q} 2>&1"
