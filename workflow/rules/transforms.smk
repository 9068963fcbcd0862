# Step 5: channel transforms of a pair. Matching strategies read the statistics (light, run in
# place); learned strategies (Table 1's sub-nets) train on the pair's features.


rule transform:
    input:
        lambda w: stats_path(w.ds, w.teacher, w.tw, w.student, w.sw),
    output:
        f"{RESULTS}/{{ds}}/transforms/{{teacher}}-{{tw}}__{{student}}-{{sw}}/{{name}}.pt",
    wildcard_constraints:
        name=STATS_TRANSFORM_FILES,
    log:
        log_path("{ds}", "transforms", "{teacher}-{tw}__{student}-{sw}", "{name}"),
    params:
        args=lambda w: transform_args(w.name),
        seed=lambda w: w.sw[1:].removesuffix("-init"),
    shell:
        "{KCD} transform --stats {input} {params.args} --seed {params.seed} --out {output} "
        "> {log} 2>&1"


rule learned_transform:
    input:
        teacher=lambda w: weights_path(w.ds, w.teacher, w.tw),
        student=lambda w: weights_path(w.ds, w.student, w.sw),
        data=lambda w: data_input(w.ds),
    output:
        f"{RESULTS}/{{ds}}/transforms/{{teacher}}-{{tw}}__{{student}}-{{sw}}/{{name}}.pt",
    wildcard_constraints:
        name=LEARNED_TRANSFORM_FILES,
    log:
        log_path("{ds}", "transforms", "{teacher}-{tw}__{student}-{sw}", "{name}"),
    resources:
        run_options=runtime_fields(learn_spec),
        launch=lambda w: launch("learned_transform", f"learn-{w.ds}-{w.student}-{w.name}", w.ds),
        gpus=lambda w: resources_of("learned_transform", w.ds).get("gpus", 0),
    params:
        spec=result_fields(learn_spec),
        args=lambda w: transform_args(w.name) + " " + learned_args(),
        seed=lambda w: w.sw[1:].removesuffix("-init"),
    shell:
        "{resources.launch} transform --spec {params.spec:q} --runtime {resources.run_options:q} "
        "{params.args} --seed {params.seed} --out {output} > {log} 2>&1"
