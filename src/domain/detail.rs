//! Teacher-detail assembly (contract §4): the teacher, its live
//! assignments, and each assignment's class, in a stable order — and the
//! document's JSON form. The domain renders it (not the HTTP layer) because
//! the store keeps every teacher's document rendered, so that a lookup is
//! one read; see `docs/ARCHITECTURE.md`.

use serde::Serialize;
use uuid::Uuid;

use super::entity::{format_timestamp, Assignment, Class, Record, Role, Teacher};

/// What the store knows of an assignment's class.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClassLookup {
    Live(Record<Class>),
    /// Deleted (a tombstone exists): the assignment is left out.
    Deleted,
    /// Not replicated (yet): the assignment shows with class fields `null`.
    Unknown,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AssignmentView {
    pub assignment: Record<Assignment>,
    pub class: Option<Record<Class>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TeacherDetail {
    pub teacher: Record<Teacher>,
    pub assignments: Vec<AssignmentView>,
}

/// Builds the detail from the teacher's live assignments and what the store
/// holds of their classes. Sorted by `className`, then `classId` (and, for
/// two assignments in one class, `assignmentId`); assignments whose class is
/// not replicated have no `className` and come last.
pub fn assemble_teacher_detail(
    teacher: Record<Teacher>,
    assignments: impl IntoIterator<Item = (Record<Assignment>, ClassLookup)>,
) -> TeacherDetail {
    let mut assignments: Vec<AssignmentView> = assignments
        .into_iter()
        .filter_map(|(assignment, class)| match class {
            ClassLookup::Live(c) => Some(AssignmentView {
                assignment,
                class: Some(c),
            }),
            ClassLookup::Unknown => Some(AssignmentView {
                assignment,
                class: None,
            }),
            ClassLookup::Deleted => None,
        })
        .collect();
    assignments.sort_by(|a, b| {
        fn name(v: &AssignmentView) -> Option<&str> {
            v.class.as_ref().map(|c| c.data.class_name.as_str())
        }
        let ids =
            |v: &AssignmentView| (v.assignment.data.class_id, v.assignment.data.assignment_id);
        // `None` (class not replicated) sorts last.
        (name(a).is_none(), name(a), ids(a)).cmp(&(name(b).is_none(), name(b), ids(b)))
    });
    TeacherDetail {
        teacher,
        assignments,
    }
}

/// The teacher-detail document (contract §4) as JSON bytes.
pub fn render(detail: &TeacherDetail) -> Vec<u8> {
    serde_json::to_vec(&teacher_detail_dto(detail)).expect("teacher detail always serializes")
}

/// The teacher-detail document (contract §4): the teacher, when this node
/// last changed it, and its live assignments sorted by `className` then
/// `classId`.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = TeacherDetail)]
pub struct TeacherDetailDto<'a> {
    #[serde(flatten)]
    teacher: &'a Teacher,
    /// When this node last changed the teacher (RFC 3339).
    #[schema(example = "2025-10-26T10:00:01.25Z")]
    last_synced_at: String,
    class_assignments: Vec<AssignmentDto<'a>>,
}

/// One assignment of the teacher with its class. The class fields are
/// `null` while the class is not replicated here; an assignment whose
/// class is deleted is left out.
#[derive(Serialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase")]
#[schema(as = ClassAssignment)]
pub struct AssignmentDto<'a> {
    assignment_id: Uuid,
    class_id: Uuid,
    #[schema(example = "Lớp 10A1")]
    class_name: Option<&'a str>,
    #[schema(example = "Khối 10")]
    grade: Option<&'a str>,
    /// The assignment's own academic year, else its class's.
    #[schema(example = "2024-2025")]
    academic_year: Option<&'a str>,
    #[schema(example = 45)]
    total_students: Option<u32>,
    school_id: Uuid,
    #[schema(example = "Toán")]
    subject: Option<&'a str>,
    role: Role,
    /// When this node last changed the assignment (RFC 3339).
    #[schema(example = "2025-10-26T10:00:01.25Z")]
    last_synced_at: String,
}

fn assignment_dto(view: &AssignmentView) -> AssignmentDto<'_> {
    let a: &Assignment = &view.assignment.data;
    let c: Option<&Class> = view.class.as_ref().map(|c| &c.data);
    AssignmentDto {
        assignment_id: a.assignment_id,
        class_id: a.class_id,
        class_name: c.map(|c| c.class_name.as_str()),
        grade: c.and_then(|c| c.grade.as_deref()),
        // The assignment's own year, else its class's.
        academic_year: a
            .academic_year
            .as_deref()
            .or(c.and_then(|c| c.academic_year.as_deref())),
        total_students: c.and_then(|c| c.total_students),
        school_id: a.school_id,
        subject: a.subject.as_deref(),
        role: a.role,
        last_synced_at: format_timestamp(view.assignment.last_synced_at),
    }
}

fn teacher_detail_dto(detail: &TeacherDetail) -> TeacherDetailDto<'_> {
    TeacherDetailDto {
        teacher: &detail.teacher.data,
        last_synced_at: format_timestamp(detail.teacher.last_synced_at),
        class_assignments: detail.assignments.iter().map(assignment_dto).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{OrderKey, Role, SyncSource, TeacherStatus};
    use uuid::Uuid;

    fn rec<T>(data: T) -> Record<T> {
        Record {
            data,
            key: OrderKey {
                version: None,
                timestamp: 0,
                delete: false,
                event_id: Uuid::nil(),
            },
            last_synced_at: 0,
            source: SyncSource::Kafka,
        }
    }

    fn assignment(id: u128, class: u128) -> Record<Assignment> {
        rec(Assignment {
            assignment_id: Uuid::from_u128(id),
            teacher_id: Uuid::from_u128(100),
            class_id: Uuid::from_u128(class),
            school_id: Uuid::nil(),
            subject: Some("Toán".into()),
            role: Role::Subject,
            academic_year: None,
        })
    }

    fn class(id: u128, name: &str) -> ClassLookup {
        ClassLookup::Live(rec(Class {
            class_id: Uuid::from_u128(id),
            school_id: Uuid::nil(),
            class_name: name.into(),
            grade: None,
            academic_year: None,
            total_students: None,
            homeroom_teacher_id: None,
        }))
    }

    #[test]
    fn sorts_by_class_name_then_class_id_and_handles_missing_classes() {
        let teacher = rec(Teacher {
            teacher_id: Uuid::from_u128(100),
            school_id: Uuid::nil(),
            full_name: "Nguyễn Thị Hương".into(),
            employee_code: None,
            email: None,
            phone: None,
            subjects: vec![],
            status: TeacherStatus::Active,
        });
        let detail = assemble_teacher_detail(
            teacher,
            [
                (assignment(1, 13), ClassLookup::Unknown),
                (assignment(2, 12), class(12, "Lớp 10A2")),
                (assignment(3, 11), class(11, "Lớp 10A2")),
                (assignment(4, 10), class(10, "Lớp 10A1")),
                (assignment(5, 14), ClassLookup::Deleted),
            ],
        );
        let order: Vec<u128> = detail
            .assignments
            .iter()
            .map(|v| v.assignment.data.assignment_id.as_u128())
            .collect();
        assert_eq!(order, [4, 3, 2, 1]);
        assert!(detail.assignments[3].class.is_none());
    }
}
