//! Builders for frontend and backend messages, for tests and benches.
#![allow(dead_code)]

fn message(tag: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![tag];
    m.extend_from_slice(&((body.len() + 4) as i32).to_be_bytes());
    m.extend_from_slice(body);
    m
}

fn cstr(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(s.as_bytes());
    out.push(0);
}

// --- Frontend ---------------------------------------------------------------

pub fn query(sql: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, sql);
    message(b'Q', &b)
}

pub fn parse(name: &str, sql: &str, types: &[u32]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, sql);
    b.extend_from_slice(&(types.len() as u16).to_be_bytes());
    for t in types {
        b.extend_from_slice(&t.to_be_bytes());
    }
    message(b'P', &b)
}

/// Bind with text parameters and no result formats.
pub fn bind(portal: &str, statement: &str, params: &[&str]) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    cstr(&mut b, statement);
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&(params.len() as u16).to_be_bytes());
    for p in params {
        b.extend_from_slice(&(p.len() as i32).to_be_bytes());
        b.extend_from_slice(p.as_bytes());
    }
    b.extend_from_slice(&0u16.to_be_bytes());
    message(b'B', &b)
}

pub fn describe(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name);
    message(b'D', &b)
}

pub fn execute(portal: &str, max_rows: i32) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, portal);
    b.extend_from_slice(&max_rows.to_be_bytes());
    message(b'E', &b)
}

pub fn close(kind: u8, name: &str) -> Vec<u8> {
    let mut b = vec![kind];
    cstr(&mut b, name);
    message(b'C', &b)
}

pub fn sync() -> Vec<u8> {
    message(b'S', &[])
}

pub fn flush() -> Vec<u8> {
    message(b'H', &[])
}

pub fn terminate() -> Vec<u8> {
    message(b'X', &[])
}

pub fn copy_data(data: &[u8]) -> Vec<u8> {
    message(b'd', data)
}

pub fn copy_done() -> Vec<u8> {
    message(b'c', &[])
}

pub fn copy_fail(why: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, why);
    message(b'f', &b)
}

/// FunctionCall of `oid` with one text argument.
pub fn function_call(oid: u32, arg: &str) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(&oid.to_be_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    b.extend_from_slice(&1u16.to_be_bytes());
    b.extend_from_slice(&(arg.len() as i32).to_be_bytes());
    b.extend_from_slice(arg.as_bytes());
    b.extend_from_slice(&0u16.to_be_bytes());
    message(b'F', &b)
}

// --- Backend ----------------------------------------------------------------

pub fn parse_complete() -> Vec<u8> {
    message(b'1', &[])
}

pub fn bind_complete() -> Vec<u8> {
    message(b'2', &[])
}

pub fn close_complete() -> Vec<u8> {
    message(b'3', &[])
}

pub fn no_data() -> Vec<u8> {
    message(b'n', &[])
}

pub fn portal_suspended() -> Vec<u8> {
    message(b's', &[])
}

pub fn empty_query() -> Vec<u8> {
    message(b'I', &[])
}

pub fn parameter_description(types: &[u32]) -> Vec<u8> {
    let mut b = (types.len() as u16).to_be_bytes().to_vec();
    for t in types {
        b.extend_from_slice(&t.to_be_bytes());
    }
    message(b't', &b)
}

/// RowDescription of text columns.
pub fn row_description(columns: &[&str]) -> Vec<u8> {
    let mut b = (columns.len() as u16).to_be_bytes().to_vec();
    for c in columns {
        cstr(&mut b, c);
        b.extend_from_slice(&0u32.to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
        b.extend_from_slice(&25u32.to_be_bytes());
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&(-1i32).to_be_bytes());
        b.extend_from_slice(&0u16.to_be_bytes());
    }
    message(b'T', &b)
}

pub fn data_row(values: &[Option<&str>]) -> Vec<u8> {
    let mut b = (values.len() as u16).to_be_bytes().to_vec();
    for v in values {
        match v {
            Some(v) => {
                b.extend_from_slice(&(v.len() as i32).to_be_bytes());
                b.extend_from_slice(v.as_bytes());
            }
            None => b.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    message(b'D', &b)
}

pub fn command_complete(tag: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, tag);
    message(b'C', &b)
}

pub fn ready(status: u8) -> Vec<u8> {
    message(b'Z', &[status])
}

fn fields(severity: &str, code: &str, text: &str) -> Vec<u8> {
    let mut b = Vec::new();
    for (c, v) in [
        (b'S', severity),
        (b'V', severity),
        (b'C', code),
        (b'M', text),
    ] {
        b.push(c);
        cstr(&mut b, v);
    }
    b.push(0);
    b
}

pub fn error(severity: &str, code: &str, text: &str) -> Vec<u8> {
    message(b'E', &fields(severity, code, text))
}

pub fn notice(text: &str) -> Vec<u8> {
    message(b'N', &fields("NOTICE", "00000", text))
}

pub fn notification(pid: i32, channel: &str, payload: &str) -> Vec<u8> {
    let mut b = pid.to_be_bytes().to_vec();
    cstr(&mut b, channel);
    cstr(&mut b, payload);
    message(b'A', &b)
}

pub fn parameter_status(name: &str, value: &str) -> Vec<u8> {
    let mut b = Vec::new();
    cstr(&mut b, name);
    cstr(&mut b, value);
    message(b'S', &b)
}

fn copy_response(tag: u8, columns: u16) -> Vec<u8> {
    let mut b = vec![0u8];
    b.extend_from_slice(&columns.to_be_bytes());
    for _ in 0..columns {
        b.extend_from_slice(&0u16.to_be_bytes());
    }
    message(tag, &b)
}

pub fn copy_in_response(columns: u16) -> Vec<u8> {
    copy_response(b'G', columns)
}

pub fn copy_out_response(columns: u16) -> Vec<u8> {
    copy_response(b'H', columns)
}

pub fn copy_both_response() -> Vec<u8> {
    copy_response(b'W', 0)
}

pub fn function_call_response(value: Option<&str>) -> Vec<u8> {
    let b = match value {
        Some(v) => {
            let mut b = (v.len() as i32).to_be_bytes().to_vec();
            b.extend_from_slice(v.as_bytes());
            b
        }
        None => (-1i32).to_be_bytes().to_vec(),
    };
    message(b'V', &b)
}

pub fn concat(parts: &[Vec<u8>]) -> Vec<u8> {
    parts.concat()
}
