# Steps 2-3: pre-training from theta0 with cross-entropy: the teachers (with RCO's anchor
# checkpoints) and the students of Algorithm 1 step 3 (also Tables 7/8's Baseline row).


rule pretrain:
    input:
        theta0=lambda w: theta0_path(w.ds, w.arch, w.seed),
        data=lambda w: data_input(w.ds),
    output:
        final=f"{RESULTS}/{{ds}}/models/{{arch}}-s{{seed}}/final.pt",
        result=f"{RESULTS}/{{ds}}/models/{{arch}}-s{{seed}}/result.json",
    wildcard_constraints:
        ds=CLASSIFICATION_DATASETS,
    log:
        log_path("{ds}", "pretrain", "{arch}-s{seed}"),
    resources:
        run_options=runtime_fields(pretrain_spec),
        launch=lambda w: launch("pretrain", f"pretrain-{w.ds}-{w.arch}-s{w.seed}", w.ds),
        gpus=lambda w: resources_of("pretrain", w.ds).get("gpus", 0),
    params:
        spec=result_fields(pretrain_spec),
    shell:
        "{resources.launch} pretrain --spec {params.spec:q} --runtime {resources.run_options:q} "
        "--tracking-uri {TRACKING_URI:q} "
        "> {log} 2>&1"
