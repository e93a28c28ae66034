//! Valid inputs for each target, the starting points for mutation (the
//! fuzz corpus and the property tests).

/// A typed message: tag, length word, body.
fn msg(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut v = vec![tag];
    v.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    v.extend_from_slice(body);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A DataRow with text columns (`None`: NULL).
fn data_row(columns: &[Option<&str>]) -> Vec<u8> {
    let mut body = (columns.len() as u16).to_be_bytes().to_vec();
    for c in columns {
        match c {
            Some(text) => {
                body.extend_from_slice(&(text.len() as i32).to_be_bytes());
                body.extend_from_slice(text.as_bytes());
            }
            None => body.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    msg(b'D', &body)
}

const ROUTE53: &str = "https://route53.amazonaws.com/doc/2013-04-01/";

fn health_check(inverted: bool, disabled: bool) -> String {
    format!(
        "<?xml version=\"1.0\"?>\n<GetHealthCheckResponse xmlns=\"{ROUTE53}\"><HealthCheck>\
         <Id>hc-fuzz</Id><CallerReference>ref</CallerReference><HealthCheckConfig>\
         <Port>5432</Port><Type>TCP</Type><FullyQualifiedDomainName>db.example</FullyQualifiedDomainName>\
         <RequestInterval>30</RequestInterval><FailureThreshold>3</FailureThreshold>\
         <Inverted>{inverted}</Inverted><Disabled>{disabled}</Disabled></HealthCheckConfig>\
         <HealthCheckVersion>1</HealthCheckVersion></HealthCheck></GetHealthCheckResponse>"
    )
}

fn health_check_status(statuses: &[&str]) -> String {
    let mut out = format!(
        "<?xml version=\"1.0\"?>\n<GetHealthCheckStatusResponse xmlns=\"{ROUTE53}\">\
         <HealthCheckObservations>"
    );
    for s in statuses {
        out.push_str(&format!(
            "<HealthCheckObservation><Region>us-east-1</Region><IPAddress>15.177.2.1</IPAddress>\
             <StatusReport><Status>{s}</Status><CheckedTime>2024-05-01T12:00:00.000Z</CheckedTime>\
             </StatusReport></HealthCheckObservation>"
        ));
    }
    out.push_str("</HealthCheckObservations></GetHealthCheckStatusResponse>");
    out
}

fn global_clusters(writer_east: bool, failover: Option<&str>) -> String {
    let member = |region: &str, writer: bool| {
        format!(
            "<GlobalClusterMember><DBClusterArn>arn:aws:rds:{region}:123456789012:cluster:app</DBClusterArn>\
             <Readers/><IsWriter>{writer}</IsWriter></GlobalClusterMember>"
        )
    };
    let failover = failover
        .map(|s| format!("<FailoverState><Status>{s}</Status></FailoverState>"))
        .unwrap_or_default();
    format!(
        "<DescribeGlobalClustersResponse xmlns=\"http://rds.amazonaws.com/doc/2014-10-31/\">\
         <DescribeGlobalClustersResult><GlobalClusters><GlobalClusterMember>\
         <GlobalClusterIdentifier>g-fuzz</GlobalClusterIdentifier><Status>available</Status>\
         <GlobalClusterMembers>{}{}</GlobalClusterMembers>{failover}</GlobalClusterMember>\
         </GlobalClusters></DescribeGlobalClustersResult></DescribeGlobalClustersResponse>",
        member("us-east-1", writer_east),
        member("us-west-2", !writer_east)
    )
}

/// `aws_status`'s layout: selector, split byte (x 16), bodies.
fn aws(selector: u8, first: &str, second: &str) -> Vec<u8> {
    let split = first.len().div_ceil(16);
    let mut first = first.as_bytes().to_vec();
    first.resize(split * 16, b' ');
    cat(&[&[selector, split as u8], &first, second.as_bytes()])
}

const CONFIG: &str = "[listen]\naddress = \"127.0.0.1:5432\"\n[routing]\nprobe_user = \"app\"\n\
                      [backend]\nkind = \"postgres\"\nauth = \"password\"\npassword = \"$$\"\n\
                      tls = \"require\"\n[[endpoints]]\nname = \"a\"\nhost = \"db.example\"\n";

/// Valid inputs for the target named `target` (empty for an unknown name).
pub fn seeds(target: &str) -> Vec<Vec<u8>> {
    match target {
        "startup_packet" => vec![
            b"\0\x03\0\0user\0app\0database\0db\0\0".to_vec(),
            b"\0\x03\0\x02user\0app\0_pq_.x\0y\0\0".to_vec(),
            b"\x04\xd2\x16\x2f".to_vec(),
            b"\x04\xd2\x16\x30".to_vec(),
            b"\x04\xd2\x16\x2e\0\0\0\x07\x01\x02\x03\x04".to_vec(),
        ],
        "backend_messages" => vec![cat(&[
            &msg(b'R', b"\0\0\0\x0aSCRAM-SHA-256\0\0"),
            &msg(b'R', b"\0\0\0\x0br=abc,s=c2FsdA==,i=4096"),
            &msg(b'R', b"\0\0\0\0"),
            &msg(b'S', b"server_version\x0015.4\0"),
            &msg(b'K', b"\0\0\0\x07\x01\x02\x03\x04"),
            &msg(b'N', b"SNOTICE\0C00000\0Mhello\0\0"),
            &msg(b'E', b"SFATAL\0C28P01\0Mbad password\0\0"),
            &msg(b'v', b"\0\x03\0\0\0\0\0\x01_pq_.x\0"),
            &msg(b'Z', b"I"),
        ])],
        "frontend_messages" => vec![
            msg(b'p', b"secret\0"),
            msg(b'p', b"SCRAM-SHA-256\0\0\0\0\x03abc"),
            msg(b'p', b"SCRAM-SHA-256\0\xff\xff\xff\xff"),
            msg(b'p', b"c=biws,r=abc,p=xyz"),
        ],
        "scram_client" => vec![cat(&[
            &[26],
            b"srv,s=QSXCR+Q6sek8bf92,i=4096",
            b"v=6rriTRBi23WpRR/wtup+mMhUZUn/dB5nLTJRsjl95G4=",
        ])],
        "scram_server" => vec![cat(&[
            &[32],
            b"n,,n=,r=rOprNGfwEbeRWgbNEkqO%hvYD",
            b"c=biws,r=rOprNGfwEbeRWgbNEkqO%hvYDpWUa2RaTCAfuxFIlj)hNlF$k0,p=dHzbZapWIk4jUhN+Ute9ytag9zjfMHgsqmmiz7AndVQ=",
        ])],
        "query_messages" => vec![cat(&[
            &msg(b'T', b"\0\x01x\0\0\0\0\0\0\0\0\0\0\x17\0\x04\xff\xff\xff\xff\0\0"),
            &data_row(&[Some("1")]),
            &data_row(&[None, Some("")]),
            &msg(b'C', b"SELECT 1\0"),
            &msg(b'E', b"SERROR\0C42P01\0Mno such table\0\0"),
            &msg(b'Z', b"I"),
        ])],
        "aurora_status" => vec![
            data_row(&[Some("f"), Some("2"), Some("1"), Some("0")]),
            data_row(&[Some("t"), None, Some("1"), Some("1500")]),
            data_row(&[
                Some("t"),
                Some("us-west-2"),
                Some("us-east-1"),
                Some("1250"),
                Some("800.5"),
            ]),
            data_row(&[Some("t")]),
        ],
        "aws_status" => vec![
            aws(
                0,
                &health_check(false, false),
                &health_check_status(&[
                    "Success: HTTP Status Code 200. ",
                    "Failure: Connection timed out.",
                ]),
            ),
            aws(2, &health_check(true, true), ""),
            aws(
                0xa0,
                "<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code>\
                 <Message>Rate exceeded</Message></Error></ErrorResponse>",
                "",
            ),
            aws(1, &global_clusters(true, None), ""),
            aws(3, &global_clusters(false, Some("failing-over")), ""),
        ],
        "config_env" => vec![
            CONFIG.as_bytes().to_vec(),
            cat(&[
                CONFIG.as_bytes(),
                b"\0BACKEND__TLS=disable\nROUTING__PROBE_INTERVAL=250ms\nADMIN__QUITQUITQUIT=true\n",
            ]),
        ],
        "boundary_tracker" => vec![cat(&[
            &[3, 1, 7, 2],
            &msg(b'Q', b"COMMIT\0"),
            &msg(b'P', b"\0select $1\0\0\0"),
            &msg(b'B', &[0; 20]),
            &msg(b'S', b""),
            &msg(b'Z', b"T"),
            &msg(b'd', &[1; 40]),
            &msg(b'c', b""),
        ])],
        _ => Vec::new(),
    }
}
