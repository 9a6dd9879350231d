-- The design document's relational alternative, holding the same data as
-- the node (benches/load/run.sh, step `pg`).
CREATE TABLE teachers (
  n integer UNIQUE NOT NULL,
  teacher_id uuid PRIMARY KEY,
  school_id uuid NOT NULL,
  full_name text NOT NULL,
  employee_code text,
  email text,
  phone text,
  subjects text[] NOT NULL,
  status text NOT NULL,
  version bigint,
  updated_at timestamptz NOT NULL
);
CREATE TABLE classes (
  class_id uuid PRIMARY KEY,
  school_id uuid NOT NULL,
  class_name text NOT NULL,
  grade text,
  academic_year text,
  total_students integer,
  homeroom_teacher_id uuid,
  version bigint,
  updated_at timestamptz NOT NULL
);
CREATE TABLE assignments (
  assignment_id uuid PRIMARY KEY,
  teacher_id uuid NOT NULL,
  class_id uuid NOT NULL,
  school_id uuid NOT NULL,
  subject text,
  role text NOT NULL,
  academic_year text,
  version bigint,
  updated_at timestamptz NOT NULL
);
