# Step 5: a channel transform (strategy x metric) from the statistics; light, runs in place.


rule transform:
    input:
        lambda w: stats_path(w.ds, w.teacher, w.tseed, w.student, w.seed),
    output:
        f"{RESULTS}/{{ds}}/transforms/{{teacher}}-s{{tseed}}__{{student}}-s{{seed}}/{{strategy}}-{{metric}}.pt",
    log:
        log_path("{ds}", "transforms", "{teacher}-s{tseed}__{student}-s{seed}", "{strategy}-{metric}"),
    shell:
        "{KCD} transform --stats {input} --strategy {wildcards.strategy} "
        "--metric {wildcards.metric} --seed {wildcards.seed} --out {output} > {log} 2>&1"
