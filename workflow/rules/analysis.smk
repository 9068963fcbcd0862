# Analyses of trained models: Table 10's channel overlap, Table 11's feature consistency and
# Figure 1's activation maps. Each is one `kcd` job over the models its spec names.


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule overlap:
    input:
        lambda w: P.spec_inputs(P.overlap_spec()),
        data=lambda w: data_input(P.ablation_setting()[0]),
    output:
        L.analysis("{ds}", "overlap.json"),
    log:
        log_path("{ds}", "analysis", "overlap"),
    resources:
        run_options=runtime_fields(lambda w: P.overlap_spec()),
        launch=lambda w: launch("analysis", f"overlap-{w.ds}", w.ds),
    params:
        spec=result_fields(lambda w: P.overlap_spec()),
    shell:
        "{resources.launch} overlap --spec {params.spec:q} --runtime {resources.run_options:q} "
        "-q > {log:q} 2>&1"


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule feature_consistency:
    input:
        lambda w: P.spec_inputs(P.consistency_spec()),
        data=lambda w: data_input(P.ablation_setting()[0]),
    output:
        L.analysis("{ds}", "feature_consistency.json"),
    log:
        log_path("{ds}", "analysis", "feature_consistency"),
    resources:
        run_options=runtime_fields(lambda w: P.consistency_spec()),
        launch=lambda w: launch("analysis", f"consistency-{w.ds}", w.ds),
    params:
        spec=result_fields(lambda w: P.consistency_spec()),
    shell:
        "{resources.launch} feature-consistency --spec {params.spec:q} --runtime {resources.run_options:q} "
        "-q > {log:q} 2>&1"


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule figure1:
    input:
        lambda w: P.spec_inputs(P.figure1_spec()),
        data=lambda w: data_input(config["figure1"]["dataset"]),
    output:
        png=report(f"{L.figure1}.png", caption="../report/figure1.rst", category="Figure 1",
                   labels={"figure": "1", "format": "png"}),
        pdf=f"{L.figure1}.pdf",
    log:
        log_path("analysis", "figure1"),
    resources:
        run_options=runtime_fields(lambda w: P.figure1_spec()),
        launch=lambda w: launch("analysis", "figure1", config["figure1"]["dataset"]),
    params:
        spec=result_fields(lambda w: P.figure1_spec()),
    shell:
        "{resources.launch} figure1 --spec {params.spec:q} --runtime {resources.run_options:q} "
        "-q > {log:q} 2>&1"


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule consistency_heatmap:
    input:
        stats=lambda w: P.heatmap_inputs(w.ds, w.teacher, w.student)["stats"],
        transform=lambda w: P.heatmap_inputs(w.ds, w.teacher, w.student)["transform"],
    output:
        png=report(f"{L.heatmap('{ds}', '{teacher}', '{student}')}.png",
                   caption="../report/heatmap.rst", category="Consistency",
                   labels={"pair": "{teacher} -> {student}", "dataset": "{ds}"}),
        csv=f"{L.heatmap('{ds}', '{teacher}', '{student}')}.csv",
    log:
        log_path("{ds}", "analysis", "heatmap-{teacher}__{student}"),
    resources:
        kcd=KCD,
        tracking=TRACKING_URI,  # not a rerun trigger (as params would be)
        tags=lambda w: urlencode({"dataset": w.ds, "teacher": w.teacher, "student": w.student,
                                  "scale": SCALE}),
    params:
        metric=lambda w: P.heatmap_inputs(w.ds, w.teacher, w.student)["metric"],
        prefix=lambda w: L.heatmap(w.ds, w.teacher, w.student),
    shell:
        "{resources.kcd} heatmap --stats {input.stats:q} --transform {input.transform:q} "
        "--metric {params.metric} --out {params.prefix:q} --tracking-uri {resources.tracking:q} "
        "--tags {resources.tags:q} > {log:q} 2>&1"
