-- One teacher detail the design document's way: the teacher, the
-- teacher's assignments, the classes of those assignments (three queries).
-- `:teachers` is replaced by the number of teachers.
\set n random(1, :teachers)
SELECT teacher_id, school_id, full_name, employee_code, email, phone, subjects, status FROM teachers WHERE n = :n \gset
SELECT assignment_id, class_id, subject, role, academic_year FROM assignments WHERE teacher_id = :teacher_id;
SELECT class_id, class_name, grade, academic_year, total_students, school_id FROM classes WHERE class_id IN (SELECT class_id FROM assignments WHERE teacher_id = :teacher_id);
