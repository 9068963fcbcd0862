# Step 8: the paper's tables from the runs' results, beside the paper's numbers, and the page
# that gathers them.


rule table:
    input:
        lambda w: P.plan_inputs(table_plan(w.n)),
    output:
        csv=L.table("{n}", "csv"),
        md=L.table("{n}", "md"),
        tex=L.table("{n}", "tex"),
    log:
        log_path("tables", "table{n}"),
    params:
        plan=lambda w: json.dumps(table_plan(w.n)),
        prefix=lambda w: L.table(w.n, "csv").removesuffix(".csv"),
    shell:
        "{KCD} table --plan {params.plan:q} --out {params.prefix:q} > {log:q} 2>&1"


rule tables_md:
    input:
        P.gathered_parts(),
    output:
        f"{RESULTS}/tables.md",
    log:
        log_path("tables", "tables_md"),
    shell:
        "{KCD} tables-md --out {output:q} {input:q} > {log:q} 2>&1"
