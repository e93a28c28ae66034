//! A local RDS endpoint for the Aurora global database control plane:
//! `DescribeGlobalClusters` in RDS's Query protocol (form-encoded POST in,
//! XML out, as the AWS SDK sends and parses it), over a global cluster whose
//! writer member and `FailoverState` a test sets. The proxy's aws-sdk-rds
//! client reaches it through `AWS_ENDPOINT_URL_RDS`. Requests must carry a
//! SigV4 `Authorization` header scoped to the `rds` service.

use std::sync::{Arc, Mutex, PoisonError};

use crate::aws_endpoints::{xml_escape, HttpResponse, HttpServer};

const NAMESPACE: &str = "http://rds.amazonaws.com/doc/2014-10-31/";

/// The global cluster the server describes.
#[derive(Clone, Debug)]
pub struct GlobalClusterState {
    pub id: String,
    /// Member cluster ARNs and whether each is the writer.
    pub members: Vec<(String, bool)>,
    /// `FailoverState.Status`, when a failover is under way.
    pub failover: Option<String>,
}

impl GlobalClusterState {
    /// A member ARN in `region` (the ARN's Region field is what the proxy
    /// matches against its endpoints' `region`).
    pub fn arn(region: &str) -> String {
        format!("arn:aws:rds:{region}:123456789012:cluster:app-{region}")
    }
}

pub struct RdsServer {
    pub http: HttpServer,
    state: Arc<Mutex<GlobalClusterState>>,
}

impl RdsServer {
    pub fn start(state: GlobalClusterState) -> Self {
        let state = Arc::new(Mutex::new(state));
        let current = Arc::clone(&state);
        let http = HttpServer::start("rds", move |req| {
            let signed = req.header("authorization").is_some_and(|a| {
                a.starts_with("AWS4-HMAC-SHA256") && a.contains("/rds/aws4_request")
            });
            if !signed {
                return error(
                    403,
                    "MissingAuthenticationToken",
                    "Request is missing a SigV4 signature",
                );
            }
            if req.method != "POST"
                || req.form_value("Action").as_deref() != Some("DescribeGlobalClusters")
            {
                return error(
                    400,
                    "InvalidAction",
                    "only DescribeGlobalClusters is served here",
                );
            }
            let state = current
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone();
            if let Some(asked) = req.form_value("GlobalClusterIdentifier") {
                if asked != state.id {
                    return error(
                        404,
                        "GlobalClusterNotFoundFault",
                        &format!("Global cluster {asked} not found"),
                    );
                }
            }
            HttpResponse::xml(200, describe(&state))
        });
        Self { http, state }
    }

    /// `AWS_ENDPOINT_URL_RDS` for the proxy.
    pub fn env(&self) -> (String, String) {
        ("AWS_ENDPOINT_URL_RDS".into(), self.http.base_url())
    }

    pub fn set(&self, update: impl FnOnce(&mut GlobalClusterState)) {
        update(&mut self.state.lock().unwrap_or_else(PoisonError::into_inner));
    }

    /// Makes the member in `region` the only writer.
    pub fn set_writer(&self, region: &str) {
        let arn = GlobalClusterState::arn(region);
        self.set(|s| {
            for (member, writer) in &mut s.members {
                *writer = *member == arn;
            }
        });
    }
}

fn describe(state: &GlobalClusterState) -> String {
    let mut members = String::new();
    for (arn, writer) in &state.members {
        members.push_str(&format!(
            "<GlobalClusterMember><DBClusterArn>{}</DBClusterArn><Readers/><IsWriter>{writer}</IsWriter>\
             <GlobalWriteForwardingStatus>disabled</GlobalWriteForwardingStatus></GlobalClusterMember>",
            xml_escape(arn)
        ));
    }
    let failover = state
        .failover
        .as_ref()
        .map(|status| {
            format!(
                "<FailoverState><Status>{}</Status><IsDataLossAllowed>true</IsDataLossAllowed></FailoverState>",
                xml_escape(status)
            )
        })
        .unwrap_or_default();
    format!(
        "<DescribeGlobalClustersResponse xmlns=\"{NAMESPACE}\"><DescribeGlobalClustersResult>\
         <GlobalClusters><GlobalClusterMember>\
         <GlobalClusterIdentifier>{id}</GlobalClusterIdentifier>\
         <GlobalClusterArn>arn:aws:rds::123456789012:global-cluster:{id}</GlobalClusterArn>\
         <Status>available</Status><Engine>aurora-postgresql</Engine>\
         <GlobalClusterMembers>{members}</GlobalClusterMembers>{failover}\
         </GlobalClusterMember></GlobalClusters>\
         </DescribeGlobalClustersResult>\
         <ResponseMetadata><RequestId>5f1e0c1a-0000-4000-8000-000000000001</RequestId></ResponseMetadata>\
         </DescribeGlobalClustersResponse>",
        id = xml_escape(&state.id)
    )
}

fn error(status: u16, code: &str, message: &str) -> HttpResponse {
    HttpResponse::xml(
        status,
        format!(
            "<ErrorResponse xmlns=\"{NAMESPACE}\"><Error><Type>Sender</Type><Code>{code}</Code>\
             <Message>{}</Message></Error><RequestId>5f1e0c1a-0000-4000-8000-000000000002</RequestId></ErrorResponse>",
            xml_escape(message)
        ),
    )
}
