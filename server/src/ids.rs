//! Typed ids: a run id cannot be passed where a user id is expected. Each is a UUID on the wire
//! and in storage (`serde` and `sqlx` see through it); `Uuid::from(id)` and `Id::from(uuid)`
//! cross the boundary to the protocol crate, whose frames carry plain UUIDs.

use uuid::Uuid;

macro_rules! id_type {
    ($($(#[$doc:meta])* $name:ident;)+) => {$(
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord,
            serde::Serialize, serde::Deserialize, sqlx::Type,
        )]
        #[serde(transparent)]
        #[sqlx(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A new, time-ordered id (UUIDv7).
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub fn as_uuid(self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl From<Uuid> for $name {
            fn from(id: Uuid) -> Self {
                Self(id)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                self.0.fmt(f)
            }
        }

        impl std::str::FromStr for $name {
            type Err = uuid::Error;

            fn from_str(text: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(text).map(Self)
            }
        }
    )+};
}

id_type! {
    /// A user (embedded auth or Supabase).
    UserId;
    /// A conversation.
    ConversationId;
    /// A message (user or assistant).
    MessageId;
    /// A run: one model answer.
    RunId;
    /// One process of the server, new at every start: the owner of the runs it drives, and the
    /// fencing token that keeps a process declared dead from writing them again.
    InstanceId;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_cross_to_and_from_uuids_and_text() {
        let run = RunId::new();
        let uuid: Uuid = run.into();
        assert_eq!(RunId::from(uuid), run);
        assert_eq!(run.to_string().parse::<RunId>().unwrap(), run);
        assert_eq!(
            serde_json::to_string(&run).unwrap(),
            format!("\"{uuid}\""),
            "a plain UUID on the wire"
        );
    }
}
