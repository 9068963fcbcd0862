# Steps 2-3: pre-training from theta0 with cross-entropy: the teachers (with RCO's anchor
# checkpoints) and the students of Algorithm 1 step 3 (also Tables 7/8's Baseline row);
# on a detection dataset, Faster R-CNN + FPN detectors (Table 9) through the same rule.


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule pretrain:
    input:
        theta0=lambda w: L.theta0(w.ds, w.arch, w.seed),
        data=lambda w: data_input(w.ds),
    output:
        final=L.final("{ds}", "{arch}", "{seed}"),
        result=L.model_file("{ds}", "{arch}", "{seed}", "result.json"),
    log:
        log_path("{ds}", "pretrain", "{arch}-s{seed}"),
    resources:
        tracking=TRACKING_URI,  # not a rerun trigger (as params would be)
        tags=run_tags(lambda w: L.model_file(w.ds, w.arch, w.seed)),
        run_options=runtime_fields(lambda w: P.pretrain_spec(w.ds, w.arch, w.seed)),
        launch=lambda w: launch("pretrain", f"pretrain-{w.ds}-{w.arch}-s{w.seed}", w.ds),
        gpus=gpus("pretrain"),
    params:
        spec=result_fields(lambda w: P.pretrain_spec(w.ds, w.arch, w.seed)),
    shell:
        "{resources.launch} pretrain --spec {params.spec:q} --runtime {resources.run_options:q} "
        "--tracking-uri {resources.tracking:q} --tags {resources.tags:q} --job-log {log:q} "
        "> {log:q} 2>&1"
