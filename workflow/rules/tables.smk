# Step 8: the paper's tables from the runs' result.json files, beside the paper's numbers.


rule comparison_table:
    input:
        lambda w: plan_inputs(comparison_plan(f"table{w.n}")),
    output:
        csv=f"{RESULTS}/table{{n}}.csv",
        md=f"{RESULTS}/table{{n}}.md",
        tex=f"{RESULTS}/table{{n}}.tex",
    wildcard_constraints:
        n="7|8",
    log:
        log_path("tables", "table{n}"),
    params:
        plan=lambda w: json.dumps(comparison_plan(f"table{w.n}")),
    shell:
        "{KCD} table --plan {params.plan:q} --out {RESULTS}/table{wildcards.n} > {log} 2>&1"


rule tables_md:
    input:
        [f"{RESULTS}/{name}.md" for name in table_names()],
    output:
        f"{RESULTS}/tables.md",
    log:
        log_path("tables", "tables_md"),
    shell:
        "{KCD} tables-md --out {output} {input} > {log} 2>&1"
