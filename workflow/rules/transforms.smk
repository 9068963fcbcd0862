# Step 5: channel transforms of a pair. Matching strategies read the statistics (light, run in
# place); learned strategies (Table 1's sub-nets) train on the pair's features.


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule transform:
    input:
        lambda w: L.stats(*pair_wildcards(w)),
    output:
        L.transform("{ds}", "{teacher}", "{tw}", "{student}", "{sw}", "{name}"),
    wildcard_constraints:
        name=STATS_FILE_WILDCARD,
    log:
        log_path("{ds}", "transforms", "{teacher}-{tw}__{student}-{sw}", "{name}"),
    resources:
        kcd=KCD,
    params:
        args=lambda w: shlex.join(P.transform_args(w.name)),
        seed=lambda w: L.tag_seed(w.sw),
    shell:
        "{resources.kcd} transform --stats {input:q} {params.args} --seed {params.seed} --out {output:q} "
        "> {log:q} 2>&1"


# lint: no conda/container per rule; every rule runs in the one kcd environment
rule learned_transform:
    input:
        teacher=lambda w: L.weights(w.ds, w.teacher, w.tw),
        student=lambda w: L.weights(w.ds, w.student, w.sw),
        data=lambda w: data_input(w.ds),
    output:
        L.transform("{ds}", "{teacher}", "{tw}", "{student}", "{sw}", "{name}"),
    wildcard_constraints:
        name=LEARNED_FILE_WILDCARD,
    log:
        log_path("{ds}", "transforms", "{teacher}-{tw}__{student}-{sw}", "{name}"),
    resources:
        run_options=runtime_fields(lambda w: P.learn_spec(*pair_wildcards(w), w.name)),
        launch=lambda w: launch("learned_transform", f"learn-{w.ds}-{w.student}-{w.name}", w.ds),
        gpus=gpus("learned_transform"),
    params:
        spec=result_fields(lambda w: P.learn_spec(*pair_wildcards(w), w.name)),
        args=lambda w: shlex.join(P.transform_args(w.name) + P.learned_args()),
        seed=lambda w: L.tag_seed(w.sw),
    shell:
        "{resources.launch} transform --spec {params.spec:q} --runtime {resources.run_options:q} "
        "{params.args} --seed {params.seed} --out {output:q} > {log:q} 2>&1"
