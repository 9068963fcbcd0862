# Table 9: Faster R-CNN + FPN detectors on COCO, the same steps as classification on the same
# layout (theta0, pre-training, statistics, transforms from rules/transforms.smk, distillation).


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule detect_init:
    output:
        L.theta0("{ds}", "{arch}", "{seed}"),
    wildcard_constraints:
        ds=DETECTION_DATASETS,
    log:
        log_path("{ds}", "init", "{arch}-s{seed}"),
    resources:
        launch=lambda w: launch("init", f"init-{w.ds}-{w.arch}-s{w.seed}", w.ds),
    params:
        spec=lambda w: json.dumps(P.detect_init_spec(w.ds, w.arch, w.seed)),
    shell:
        "{resources.launch} detect-init --spec {params.spec:q} -q > {log:q} 2>&1"


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule detect_pretrain:
    input:
        theta0=lambda w: L.theta0(w.ds, w.arch, w.seed),
        data=lambda w: data_input(w.ds),
    output:
        final=L.final("{ds}", "{arch}", "{seed}"),
        result=L.model_file("{ds}", "{arch}", "{seed}", "result.json"),
    wildcard_constraints:
        ds=DETECTION_DATASETS,
    log:
        log_path("{ds}", "pretrain", "{arch}-s{seed}"),
    resources:
        tracking=TRACKING_URI,  # not a rerun trigger (as params would be)
        tags=run_tags(lambda w: L.model_file(w.ds, w.arch, w.seed)),
        run_options=runtime_fields(lambda w: P.detect_pretrain_spec(w.ds, w.arch, w.seed)),
        launch=lambda w: launch("pretrain", f"pretrain-{w.ds}-{w.arch}-s{w.seed}", w.ds),
        gpus=gpus("pretrain"),
    params:
        spec=result_fields(lambda w: P.detect_pretrain_spec(w.ds, w.arch, w.seed)),
    shell:
        "{resources.launch} detect-train --spec {params.spec:q} --runtime {resources.run_options:q} "
        "--tracking-uri {resources.tracking:q} --tags {resources.tags:q} "
        "> {log:q} 2>&1"


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule detect_statistics:
    input:
        teacher=lambda w: L.weights(w.ds, w.teacher, w.tw),
        student=lambda w: L.weights(w.ds, w.student, w.sw),
        data=lambda w: data_input(w.ds),
    output:
        L.stats("{ds}", "{teacher}", "{tw}", "{student}", "{sw}"),
    wildcard_constraints:
        ds=DETECTION_DATASETS,
    log:
        log_path("{ds}", "statistics", "{teacher}-{tw}__{student}-{sw}"),
    resources:
        run_options=runtime_fields(lambda w: P.detect_stats_spec(*pair_wildcards(w))),
        launch=lambda w: launch("statistics", f"stats-{w.ds}-{w.teacher}-{w.tw}-{w.student}-{w.sw}", w.ds),
        gpus=gpus("statistics"),
    params:
        spec=result_fields(lambda w: P.detect_stats_spec(*pair_wildcards(w))),
    shell:
        "{resources.launch} detect-statistics --spec {params.spec:q} "
        "--runtime {resources.run_options:q} -q > {log:q} 2>&1"


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule detect_distill:
    input:
        theta0=lambda w: L.theta0(w.ds, w.student, w.seed),
        teacher=lambda w: L.final(w.ds, w.teacher, w.tseed),
        transform=lambda w: P.run_transforms(w.ds, w.teacher, w.tseed, w.student, w.seed, w.transform),
        data=lambda w: data_input(w.ds),
    output:
        result=RUN_FILE.format(file="result.json"),
        final=RUN_FILE.format(file="final.pt"),
    wildcard_constraints:
        ds=DETECTION_DATASETS,
        method="l2",
    log:
        log_path("{ds}", "runs", "{teacher}-s{tseed}__{student}", "{method}", "{transform}", "s{seed}"),
    resources:
        tracking=TRACKING_URI,  # not a rerun trigger (as params would be)
        tags=run_tags(lambda w: L.run_file(*run_wildcards(w))),
        run_options=runtime_fields(lambda w: P.detect_distill_spec(*run_wildcards(w))),
        launch=lambda w: launch("distill", f"distill-{w.ds}-{w.student}-{w.method}-{w.transform}-s{w.seed}", w.ds),
        gpus=gpus("distill"),
    params:
        spec=result_fields(lambda w: P.detect_distill_spec(*run_wildcards(w))),
    shell:
        "{resources.launch} detect-train --spec {params.spec:q} --runtime {resources.run_options:q} "
        "--tracking-uri {resources.tracking:q} --tags {resources.tags:q} "
        "> {log:q} 2>&1"
