#!/usr/bin/env python3
"""Turns a snapshot file (emis-edge gen --out) into teachers.csv,
classes.csv and assignments.csv for PostgreSQL's COPY (benches/load/run.sh,
step `pg`). Teachers get a number 1..n so that pgbench can pick one at
random."""
import csv
import json
import sys

src, out = sys.argv[1], sys.argv[2]
files = {k: open(f"{out}/{k}.csv", "w", newline="", encoding="utf-8")
         for k in ("teachers", "classes", "assignments")}
w = {k: csv.writer(f) for k, f in files.items()}
n = 0
with open(src, encoding="utf-8") as f:
    for line in f:
        r = json.loads(line)
        kind = r["kind"]
        if kind == "teacher":
            n += 1
            w["teachers"].writerow([
                n, r["teacherId"], r["schoolId"], r["fullName"],
                r.get("employeeCode"), r.get("email"), r.get("phone"),
                "{" + ",".join('"%s"' % s for s in r.get("subjects", [])) + "}",
                r.get("status", "active"), r["version"], r["timestamp"]])
        elif kind == "class":
            w["classes"].writerow([
                r["classId"], r["schoolId"], r["className"], r.get("grade"),
                r.get("academicYear"), r.get("totalStudents"),
                r.get("homeroomTeacherId"), r["version"], r["timestamp"]])
        elif kind == "assignment":
            w["assignments"].writerow([
                r["assignmentId"], r["teacherId"], r["classId"], r["schoolId"],
                r.get("subject"), r["role"], r.get("academicYear"),
                r["version"], r["timestamp"]])
for f in files.values():
    f.close()
