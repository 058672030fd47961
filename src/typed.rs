//! Typed tasks: the args type names its kind and carries its defaults, so
//! the kind cannot be misspelt, the handler gets decoded args, and an
//! insert-only client applies the right queue and attempts.
//!
//! ```
//! use proto_tasker::{KindDefaults, TaskArgs, TaskError, TaskRegistry};
//! use serde::{Deserialize, Serialize};
//!
//! #[derive(Serialize, Deserialize)]
//! struct SendEmail {
//!     to: String,
//! }
//!
//! impl TaskArgs for SendEmail {
//!     const KIND: &'static str = "send_email";
//!     fn defaults() -> KindDefaults {
//!         KindDefaults {
//!             queue: Some("emails".into()),
//!             max_attempts: Some(5),
//!             ..Default::default()
//!         }
//!     }
//! }
//!
//! let mut registry = TaskRegistry::new();
//! registry.register_typed(|email: SendEmail, _ctx| async move {
//!     println!("to {}", email.to);
//!     Ok::<_, TaskError>(())
//! });
//! // Then: client.enqueue_typed(SendEmail { to: "a@example.com".into() }).await?
//! ```

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::executor::{ArgsError, TaskContext, TaskError, TaskExecutor, TaskOutput};
use crate::registry::{KindDefaults, TaskRegistry};
use crate::task::{NewTask, TaskOptions};

/// The args of one kind of task, naming the kind and its defaults (River's
/// `JobArgs` and `InsertOpts`).
pub trait TaskArgs: Serialize + DeserializeOwned + Send + Sync + 'static {
    /// The kind tasks with these args have.
    const KIND: &'static str;

    /// Queue, attempts, timeout and backoff of this kind, for fields the
    /// caller leaves unset. Registered with the executor, declared by the
    /// nodes that run it, and carried by every [`NewTask::typed`].
    fn defaults() -> KindDefaults {
        KindDefaults::default()
    }
}

/// Runs a typed handler: decodes the args (bad args discard the task:
/// retrying will not fix them), and stores what it returns as the result.
struct Typed<A, F> {
    handler: F,
    args: PhantomData<fn() -> A>,
}

#[async_trait]
impl<A, F, Fut, R> TaskExecutor for Typed<A, F>
where
    A: TaskArgs,
    F: Fn(A, TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<R, TaskError>> + Send + 'static,
    R: Serialize + Send + 'static,
{
    async fn execute(&self, ctx: TaskContext) -> Result<TaskOutput, TaskError> {
        let args: A = ctx.args()?;
        let out = (self.handler)(args, ctx).await?;
        serde_json::to_value(out)
            .map_err(|e| TaskError::failed(format!("the result does not serialize: {e}")))
    }

    /// Args that do not decode into `A` are refused at enqueue.
    fn check_args(&self, args: &serde_json::Value) -> Result<(), ArgsError> {
        A::deserialize(args)
            .map(|_| ())
            .map_err(|e| ArgsError::new("args", format!("not a {}: {e}", A::KIND)))
    }
}

impl TaskRegistry {
    /// Register `handler` for the kind `A` names, with `A`'s defaults. The
    /// handler gets the decoded args and the attempt's context, and may
    /// return anything that serializes (stored as the task's result).
    pub fn register_typed<A, F, Fut, R>(&mut self, handler: F) -> &mut Self
    where
        A: TaskArgs,
        F: Fn(A, TaskContext) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<R, TaskError>> + Send + 'static,
        R: Serialize + Send + 'static,
    {
        let executor: Arc<dyn TaskExecutor> = Arc::new(Typed {
            handler,
            args: PhantomData,
        });
        self.register_with(A::KIND, executor, A::defaults())
    }
}

impl NewTask {
    /// A task of the kind `args` names, carrying the kind's defaults. Fails
    /// only if `args` does not serialize to JSON.
    pub fn typed<A: TaskArgs>(args: &A) -> Result<NewTask, serde_json::Error> {
        Ok(NewTask {
            kind: A::KIND.to_string(),
            args: serde_json::to_value(args)?,
            options: TaskOptions::default(),
            defaults: Some(A::defaults()),
        })
    }
}
