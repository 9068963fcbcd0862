# Analyses of trained models: Table 10's channel overlap, Table 11's feature consistency and
# Figure 1's activation maps. Each is one `kcd` job over the models its spec names.


rule overlap:
    input:
        lambda w: spec_inputs(overlap_spec()),
        data=lambda w: data_input(ablation_setting()[0]),
    output:
        f"{RESULTS}/{{ds}}/analysis/overlap.json",
    log:
        log_path("{ds}", "analysis", "overlap"),
    resources:
        run_options=runtime_fields(lambda w: overlap_spec()),
        launch=lambda w: launch("analysis", f"overlap-{w.ds}", w.ds),
    params:
        spec=result_fields(lambda w: overlap_spec()),
    shell:
        "{resources.launch} overlap --spec {params.spec:q} --runtime {resources.run_options:q} "
        "-q > {log} 2>&1"


rule feature_consistency:
    input:
        lambda w: spec_inputs(consistency_spec()),
        data=lambda w: data_input(ablation_setting()[0]),
    output:
        f"{RESULTS}/{{ds}}/analysis/feature_consistency.json",
    log:
        log_path("{ds}", "analysis", "feature_consistency"),
    resources:
        run_options=runtime_fields(lambda w: consistency_spec()),
        launch=lambda w: launch("analysis", f"consistency-{w.ds}", w.ds),
    params:
        spec=result_fields(lambda w: consistency_spec()),
    shell:
        "{resources.launch} feature-consistency --spec {params.spec:q} --runtime {resources.run_options:q} "
        "-q > {log} 2>&1"


rule figure1:
    input:
        lambda w: spec_inputs(figure1_spec()),
        data=lambda w: data_input(FIGURE1["dataset"]),
    output:
        png=f"{RESULTS}/figure1.png",
        pdf=f"{RESULTS}/figure1.pdf",
    log:
        log_path("analysis", "figure1"),
    resources:
        run_options=runtime_fields(lambda w: figure1_spec()),
        launch=lambda w: launch("analysis", "figure1", FIGURE1["dataset"]),
    params:
        spec=result_fields(lambda w: figure1_spec()),
    shell:
        "{resources.launch} figure1 --spec {params.spec:q} --runtime {resources.run_options:q} "
        "-q > {log} 2>&1"
