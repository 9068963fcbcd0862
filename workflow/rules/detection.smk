# Table 9: Faster R-CNN + FPN detectors on COCO, the same steps as classification on the same
# layout (theta0, pre-training, statistics, transforms from rules/transforms.smk, distillation).


rule detect_init:
    output:
        f"{RESULTS}/{{ds}}/init/{{arch}}-s{{seed}}.pt",
    wildcard_constraints:
        ds=DETECTION_DATASETS,
    log:
        log_path("{ds}", "init", "{arch}-s{seed}"),
    resources:
        launch=lambda w: launch("init", f"init-{w.ds}-{w.arch}-s{w.seed}", w.ds),
    params:
        spec=detect_init_spec,
    shell:
        "{resources.launch} detect-init --spec {params.spec:q} -q > {log} 2>&1"


rule detect_pretrain:
    input:
        theta0=lambda w: theta0_path(w.ds, w.arch, w.seed),
        data=lambda w: data_input(w.ds),
    output:
        final=f"{RESULTS}/{{ds}}/models/{{arch}}-s{{seed}}/final.pt",
        result=f"{RESULTS}/{{ds}}/models/{{arch}}-s{{seed}}/result.json",
    wildcard_constraints:
        ds=DETECTION_DATASETS,
    log:
        log_path("{ds}", "pretrain", "{arch}-s{seed}"),
    resources:
        run_options=runtime_fields(detect_pretrain_spec),
        launch=lambda w: launch("pretrain", f"pretrain-{w.ds}-{w.arch}-s{w.seed}", w.ds),
        gpus=lambda w: resources_of("pretrain", w.ds).get("gpus", 0),
    params:
        spec=result_fields(detect_pretrain_spec),
    shell:
        "{resources.launch} detect-train --spec {params.spec:q} --runtime {resources.run_options:q} "
        "--tracking-uri {TRACKING_URI:q} "
        "> {log} 2>&1"


rule detect_statistics:
    input:
        teacher=lambda w: weights_path(w.ds, w.teacher, w.tw),
        student=lambda w: weights_path(w.ds, w.student, w.sw),
        data=lambda w: data_input(w.ds),
    output:
        f"{RESULTS}/{{ds}}/stats/{{teacher}}-{{tw}}__{{student}}-{{sw}}.pt",
    wildcard_constraints:
        ds=DETECTION_DATASETS,
    log:
        log_path("{ds}", "statistics", "{teacher}-{tw}__{student}-{sw}"),
    resources:
        run_options=runtime_fields(detect_stats_spec),
        launch=lambda w: launch("statistics", f"stats-{w.ds}-{w.teacher}-{w.tw}-{w.student}-{w.sw}", w.ds),
        gpus=lambda w: resources_of("statistics", w.ds).get("gpus", 0),
    params:
        spec=result_fields(detect_stats_spec),
    shell:
        "{resources.launch} detect-statistics --spec {params.spec:q} "
        "--runtime {resources.run_options:q} -q > {log} 2>&1"


rule detect_distill:
    input:
        theta0=lambda w: theta0_path(w.ds, w.student, w.seed),
        teacher=lambda w: f"{model_dir(w.ds, w.teacher, w.tseed)}/final.pt",
        transform=distill_transform,
        data=lambda w: data_input(w.ds),
    output:
        result=f"{RESULTS}/{{ds}}/runs/{{teacher}}-s{{tseed}}__{{student}}/{{method}}/{{transform}}/s{{seed}}/result.json",
        final=f"{RESULTS}/{{ds}}/runs/{{teacher}}-s{{tseed}}__{{student}}/{{method}}/{{transform}}/s{{seed}}/final.pt",
    wildcard_constraints:
        ds=DETECTION_DATASETS,
        method="l2",
    log:
        log_path("{ds}", "runs", "{teacher}-s{tseed}__{student}", "{method}", "{transform}", "s{seed}"),
    resources:
        run_options=runtime_fields(detect_distill_spec),
        launch=lambda w: launch("distill", f"distill-{w.ds}-{w.student}-{w.method}-{w.transform}-s{w.seed}", w.ds),
        gpus=lambda w: resources_of("distill", w.ds).get("gpus", 0),
    params:
        spec=result_fields(detect_distill_spec),
    shell:
        "{resources.launch} detect-train --spec {params.spec:q} --runtime {resources.run_options:q} "
        "--tracking-uri {TRACKING_URI:q} "
        "> {log} 2>&1"
