//! Accounts and credits, tokens, flavors, images, operations and the audit
//! log. Writes here are admin-only; tenants may read their own account,
//! the flavors, the images they can use and their operations.

use super::{created, path_id, query, Body, Caller};
use crate::auth;
use crate::db::{is_unique_violation, now_ms, rows};
use crate::error::{ApiError, ApiResult};
use crate::AppState;
use axum::extract::{Path, Query, State};
use axum::response::Response;
use axum::routing::{get, post};
use axum::{Json, Router};
use gantry_proto::api::v1::*;
use gantry_proto::ids::*;
use gantry_proto::validate;
use std::collections::HashMap;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/account", get(my_account))
        .route("/admin/accounts", post(create_account).get(list_accounts))
        .route(
            "/admin/accounts/{id}",
            get(get_account).patch(update_account),
        )
        .route("/admin/accounts/{id}/credits", post(add_credit))
        .route("/admin/tokens", post(create_token).get(list_tokens))
        .route("/admin/tokens/{id}", axum::routing::delete(revoke_token))
        .route("/flavors", get(list_flavors))
        .route("/admin/flavors", post(create_flavor))
        .route("/images", get(list_images))
        .route("/admin/images", post(create_image))
        .route("/admin/audit", get(list_audit))
        .route("/operations/{id}", get(get_operation))
}

pub(crate) async fn load_account(st: &AppState, id: &AccountId) -> ApiResult<AccountInfo> {
    let sql = format!("SELECT {} FROM accounts WHERE id = $1", rows::ACCOUNT_COLS);
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no account {id}")))?;
    Ok(rows::account(&row)?)
}

async fn my_account(State(st): State<AppState>, who: Caller) -> ApiResult<Json<AccountInfo>> {
    let id = who
        .account
        .ok_or_else(|| ApiError::NotFound("an admin token has no account".into()))?;
    Ok(Json(load_account(&st, &id).await?))
}

async fn create_account(
    State(st): State<AppState>,
    who: Caller,
    Body(req): Body<CreateAccount>,
) -> ApiResult<Response> {
    who.require_admin()?;
    validate::object_name("name", &req.name)?;
    let quota = req
        .snapshot_quota_gib
        .unwrap_or(st.cfg.default_snapshot_quota_gib);
    validate::in_range("snapshot_quota_gib", quota, 0, 1 << 30)?;
    let id = AccountId::new();
    let res = sqlx::query(
        "INSERT INTO accounts (id, name, billing_complete, snapshot_quota_gib, created_ms) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id.to_string())
    .bind(&req.name)
    .bind(req.billing_profile_complete as i64)
    .bind(quota as i64)
    .bind(now_ms())
    .execute(&st.db.pool)
    .await;
    match res {
        Err(e) if is_unique_violation(&e) => Err(ApiError::Conflict(format!(
            "an account named {:?} already exists",
            req.name
        ))),
        Err(e) => Err(e.into()),
        Ok(_) => Ok(created(load_account(&st, &id).await?)),
    }
}

async fn list_accounts(
    State(st): State<AppState>,
    who: Caller,
) -> ApiResult<Json<Vec<AccountInfo>>> {
    who.require_admin()?;
    let sql = format!("SELECT {} FROM accounts ORDER BY name", rows::ACCOUNT_COLS);
    let found = sqlx::query(&sql).fetch_all(&st.db.pool).await?;
    Ok(Json(
        found.iter().map(rows::account).collect::<Result<_, _>>()?,
    ))
}

async fn get_account(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<AccountInfo>> {
    let id: AccountId = path_id(&id, "account")?;
    if !who.can_see(&id) {
        return Err(ApiError::NotFound(format!("no account {id}")));
    }
    Ok(Json(load_account(&st, &id).await?))
}

async fn update_account(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Body(req): Body<UpdateAccount>,
) -> ApiResult<Json<AccountInfo>> {
    who.require_admin()?;
    let id: AccountId = path_id(&id, "account")?;
    if let Some(q) = req.snapshot_quota_gib {
        validate::in_range("snapshot_quota_gib", q, 0, 1 << 30)?;
    }
    load_account(&st, &id).await?;
    sqlx::query(
        "UPDATE accounts SET billing_complete = COALESCE($1, billing_complete), \
         snapshot_quota_gib = COALESCE($2, snapshot_quota_gib) WHERE id = $3",
    )
    .bind(req.billing_profile_complete.map(i64::from))
    .bind(req.snapshot_quota_gib.map(|q| q as i64))
    .bind(id.to_string())
    .execute(&st.db.pool)
    .await?;
    Ok(Json(load_account(&st, &id).await?))
}

async fn add_credit(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
    Body(req): Body<AddCredit>,
) -> ApiResult<Json<AccountInfo>> {
    who.require_admin()?;
    let id: AccountId = path_id(&id, "account")?;
    validate::free_text("note", &req.note, 200)?;
    use gantry_proto::api::v1::MAX_CREDIT_CHANGE_MICROS;
    if req.amount_micros == 0 || req.amount_micros.unsigned_abs() > MAX_CREDIT_CHANGE_MICROS as u64
    {
        return Err(ApiError::invalid(
            "amount_micros",
            format!("must be non-zero and at most {MAX_CREDIT_CHANGE_MICROS} in size"),
        ));
    }
    let mut tx = st.db.begin_write().await?;
    // Checked: the balance stays within ±MAX_CREDIT_MICROS, else 422.
    let found = crate::billing::move_credit(
        &mut tx,
        &id,
        req.amount_micros,
        st.clock.now_ms(),
        "amount_micros",
    )
    .await
    .map_err(|e| {
        tracing::warn!(account = %id, amount_micros = req.amount_micros, error = %e,
            "refused a credit change");
        ApiError::from(e)
    })?;
    if !found {
        return Err(ApiError::NotFound(format!("no account {id}")));
    }
    sqlx::query(
        "INSERT INTO credit_ledger (id, account_id, amount_micros, note, at_ms) \
         VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(uuid::Uuid::now_v7().simple().to_string())
    .bind(id.to_string())
    .bind(req.amount_micros)
    .bind(&req.note)
    .bind(now_ms())
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    Ok(Json(load_account(&st, &id).await?))
}

async fn create_token(
    State(st): State<AppState>,
    who: Caller,
    Body(req): Body<CreateToken>,
) -> ApiResult<Response> {
    who.require_admin()?;
    validate::object_name("name", &req.name)?;
    if let Some(a) = &req.account {
        load_account(&st, a)
            .await
            .map_err(|_| ApiError::invalid("account", format!("no account {a}")))?;
    }
    if let Some(secs) = req.expires_in_secs {
        validate::in_range(
            "expires_in_secs",
            secs,
            MIN_TOKEN_LIFETIME_SECS,
            MAX_TOKEN_LIFETIME_SECS,
        )?;
    }
    let id = TokenId::new();
    let (token, hash) = auth::mint(id);
    let created_ms = st.clock.now_ms();
    // In range, so no overflow: at most five years of milliseconds.
    let expires_ms = req.expires_in_secs.map(|s| created_ms + s as i64 * 1000);
    let new = auth::NewToken {
        id,
        name: &req.name,
        hash_hex: &hash,
        account: req.account,
        created_ms,
        expires_ms,
    };
    auth::insert_token(&st.db, new).await?;
    Ok(created(CreatedToken {
        info: TokenInfo {
            id,
            name: req.name,
            account: req.account,
            created_at: crate::db::to_time(created_ms),
            revoked: false,
            expires_at: expires_ms.map(crate::db::to_time),
        },
        token,
    }))
}

async fn list_tokens(State(st): State<AppState>, who: Caller) -> ApiResult<Json<Vec<TokenInfo>>> {
    who.require_admin()?;
    let sql = format!(
        "SELECT {} FROM tokens ORDER BY created_ms",
        rows::TOKEN_COLS
    );
    let found = sqlx::query(&sql).fetch_all(&st.db.pool).await?;
    Ok(Json(
        found.iter().map(rows::token).collect::<Result<_, _>>()?,
    ))
}

async fn revoke_token(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<TokenInfo>> {
    who.require_admin()?;
    let id: TokenId = path_id(&id, "token")?;
    sqlx::query("UPDATE tokens SET revoked = 1 WHERE id = $1")
        .bind(id.to_string())
        .execute(&st.db.pool)
        .await?;
    st.verifier.forget_all();
    let sql = format!("SELECT {} FROM tokens WHERE id = $1", rows::TOKEN_COLS);
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(&st.db.pool)
        .await?
        .ok_or_else(|| ApiError::NotFound(format!("no token {id}")))?;
    Ok(Json(rows::token(&row)?))
}

async fn list_flavors(State(st): State<AppState>) -> ApiResult<Json<Vec<FlavorInfo>>> {
    let sql = format!("SELECT {} FROM flavors ORDER BY name", rows::FLAVOR_COLS);
    let found = sqlx::query(&sql).fetch_all(&st.db.pool).await?;
    Ok(Json(
        found.iter().map(rows::flavor).collect::<Result<_, _>>()?,
    ))
}

async fn create_flavor(
    State(st): State<AppState>,
    who: Caller,
    Body(req): Body<CreateFlavor>,
) -> ApiResult<Response> {
    use gantry_proto::spec::{MAX_DISK_GIB, MAX_MEMORY_MIB, MAX_VCPUS, MIN_MEMORY_MIB};
    who.require_admin()?;
    validate::object_name("name", &req.name)?;
    validate::in_range("vcpus", req.vcpus.into(), 1, MAX_VCPUS)?;
    validate::in_range("memory_mib", req.memory_mib, MIN_MEMORY_MIB, MAX_MEMORY_MIB)?;
    validate::in_range("root_disk_gib", req.root_disk_gib, 1, MAX_DISK_GIB)?;
    validate::in_range("gpu_count", req.gpu_count.into(), 0, MAX_HOST_GPUS as u64)?;
    validate::in_range(
        "price_micros_per_hour",
        req.price_micros_per_hour.max(0) as u64,
        0,
        1 << 40,
    )?;
    if req.price_micros_per_hour < 0 {
        return Err(ApiError::invalid(
            "price_micros_per_hour",
            "must not be negative",
        ));
    }
    match (&req.gpu_model, req.gpu_count) {
        (Some(m), n) if n > 0 => crate::gpus::check_model("gpu_model", m)?,
        (None, 0) => {}
        (Some(_), _) => {
            return Err(ApiError::invalid(
                "gpu_count",
                "must be at least 1 with a gpu_model",
            ))
        }
        (None, _) => {
            return Err(ApiError::invalid(
                "gpu_model",
                "is required when gpu_count is set",
            ))
        }
    }
    let id = FlavorId::new();
    let res = sqlx::query(
        "INSERT INTO flavors (id, name, vcpus, memory_mib, root_disk_gib, gpu_model, gpu_count, \
         price_micros_per_hour, created_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(id.to_string())
    .bind(&req.name)
    .bind(req.vcpus as i64)
    .bind(req.memory_mib as i64)
    .bind(req.root_disk_gib as i64)
    .bind(req.gpu_model.clone())
    .bind(req.gpu_count as i64)
    .bind(req.price_micros_per_hour)
    .bind(now_ms())
    .execute(&st.db.pool)
    .await;
    match res {
        Err(e) if is_unique_violation(&e) => Err(ApiError::Conflict(format!(
            "a flavor named {:?} already exists",
            req.name
        ))),
        Err(e) => Err(e.into()),
        Ok(_) => Ok(created(FlavorInfo {
            id,
            name: req.name,
            vcpus: req.vcpus,
            memory_mib: req.memory_mib,
            root_disk_gib: req.root_disk_gib,
            gpu_model: req.gpu_model,
            gpu_count: req.gpu_count,
            price_micros_per_hour: req.price_micros_per_hour,
        })),
    }
}

async fn list_images(State(st): State<AppState>, who: Caller) -> ApiResult<Json<Vec<ImageInfo>>> {
    let sql = format!(
        "SELECT {} FROM images WHERE account_id IS NULL OR $1 = '' OR account_id = $1 \
         ORDER BY created_ms",
        rows::IMAGE_COLS
    );
    let mine = who.account.map(|a| a.to_string()).unwrap_or_default();
    let found = sqlx::query(&sql).bind(mine).fetch_all(&st.db.pool).await?;
    Ok(Json(
        found.iter().map(rows::image).collect::<Result<_, _>>()?,
    ))
}

async fn create_image(
    State(st): State<AppState>,
    who: Caller,
    Body(req): Body<CreateImage>,
) -> ApiResult<Response> {
    who.require_admin()?;
    validate::object_name("name", &req.name)?;
    validate::in_range(
        "size_gib",
        req.size_gib,
        1,
        gantry_proto::spec::MAX_DISK_GIB,
    )?;
    if let Some(o) = &req.origin {
        check_origin("origin", o)?;
    }
    let origin = req
        .origin
        .as_ref()
        .map(|o| serde_json::to_string(o).unwrap_or_default());
    let id = ImageId::new();
    let at = now_ms();
    sqlx::query(
        "INSERT INTO images (id, name, size_gib, origin, created_ms) VALUES ($1, $2, $3, $4, $5)",
    )
    .bind(id.to_string())
    .bind(&req.name)
    .bind(req.size_gib as i64)
    .bind(origin)
    .bind(at)
    .execute(&st.db.pool)
    .await?;
    Ok(created(ImageInfo {
        id,
        name: req.name,
        size_gib: req.size_gib,
        account: None,
        source_snapshot: None,
        created_at: crate::db::to_time(at),
    }))
}

/// An image origin's files are absolute host paths without `..` or control
/// characters ([`validate::host_path`]); the kernel command line is one
/// line of at most 4096 characters; the image a snapshot boots like comes
/// from files. Errors name the field, e.g. `origin.disk`.
fn check_origin(field: &str, o: &gantry_proto::api::agent::ImageOrigin) -> ApiResult<()> {
    use gantry_proto::api::agent::ImageOrigin;
    match o {
        ImageOrigin::File {
            disk,
            kernel,
            initrd,
            cmdline,
        } => {
            validate::host_path(&format!("{field}.disk"), disk)?;
            for (name, p) in [("kernel", kernel), ("initrd", initrd)] {
                if let Some(p) = p {
                    validate::host_path(&format!("{field}.{name}"), p)?;
                }
            }
            if let Some(c) = cmdline {
                let f = format!("{field}.cmdline");
                validate::free_text(&f, c, 4096)?;
                if c.contains(['\n', '\t']) {
                    return Err(ApiError::invalid(f, "must be one line"));
                }
            }
        }
        ImageOrigin::Snapshot {
            boot_like_source: Some(src),
            ..
        } => {
            let f = format!("{field}.boot_like_source.origin");
            if !matches!(src.origin, ImageOrigin::File { .. }) {
                return Err(ApiError::invalid(f, "must be a file origin"));
            }
            check_origin(&f, &src.origin)?;
        }
        ImageOrigin::Snapshot { .. } => {}
    }
    Ok(())
}

async fn list_audit(
    State(st): State<AppState>,
    who: Caller,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Vec<AuditEntry>>> {
    who.require_admin()?;
    query(&q, &["account", "limit"])?;
    let limit = match q.get("limit") {
        None => 100,
        Some(l) => {
            let n: u64 = l
                .parse()
                .map_err(|_| ApiError::bad("limit", "must be a whole number"))?;
            validate::in_range("limit", n, 1, 10_000)?;
            n as i64
        }
    };
    let account = match q.get("account") {
        Some(a) => Some(
            a.parse::<AccountId>()
                .map_err(|e| ApiError::bad("account", e.to_string()))?
                .to_string(),
        ),
        None => None,
    };
    Ok(Json(
        crate::audit::list(&st.db, account.as_deref(), limit).await?,
    ))
}

async fn get_operation(
    State(st): State<AppState>,
    who: Caller,
    Path(id): Path<String>,
) -> ApiResult<Json<OperationInfo>> {
    let id: OperationId = path_id(&id, "operation")?;
    let sql = format!(
        "SELECT {}, account_id FROM operations WHERE id = $1",
        rows::OPERATION_COLS
    );
    let row = sqlx::query(&sql)
        .bind(id.to_string())
        .fetch_optional(&st.db.pool)
        .await?;
    let not_found = || ApiError::NotFound(format!("no operation {id}"));
    let row = row.ok_or_else(not_found)?;
    let owner: Option<AccountId> = crate::db::parsed_opt(&row, "account_id", "operations")?;
    // Host operations (no account) are for admins only.
    if owner.map_or(!who.is_admin(), |o| !who.can_see(&o)) {
        return Err(not_found());
    }
    Ok(Json(rows::operation(&row)?))
}
